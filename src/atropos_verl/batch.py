"""Scored groups + advantages → the packed TensorDict verl's FSDP engine trains on.

verl's engine consumes unpadded ("no padding") jagged tensors: ``input_ids`` and
``position_ids`` per sequence, and returns ``log_probs`` whose slot ``t`` is
``log p(token t+1 | ≤ t)`` (the label is the sequence rolled left by one). Every
per-token input of our loss is therefore stored in that *shifted* layout here,
once, so the loss lines up element-wise:

    loss_mask[t]     = weight of token t+1   (0 at the last slot)
    advantages[t]    = A[t+1]
    old_log_probs[t] = inference_logprobs[t+1]
    ref_log_probs[t] = ref_logprobs[t+1]     (when any group sends them, or loss.ref_model is set)
    distill_token_ids / distill_logprobs, row values t*K..t*K+K-1 = the teacher's
        top-k for token t+1, padded to the batch's K with id -1 (when any group sends them)

``loss_mask`` holds the reduction's weights: 1 per trained token (token-mean,
sum) or 1/n_i for a sequence with n_i trained tokens (sequence-mean), because
verl sums it over the mini-batch into the loss normaliser.

The batch is padded with zero-weight copies of its shortest sequence up to a
multiple of (data-parallel size × mini-batches): verl splits batches evenly,
and a padding row changes neither the loss nor the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from atropos_verl.groups import IGNORED, ScoredGroup


@dataclass(frozen=True)
class BatchStats:
    num_sequences: int
    num_padding_sequences: int
    num_tokens: int
    num_trained_tokens: int
    max_sequence_len: int

    def as_metrics(self) -> dict[str, float]:
        return {
            "batch/sequences": self.num_sequences,
            "batch/padding_sequences": self.num_padding_sequences,
            "batch/tokens": self.num_tokens,
            "batch/trained_tokens": self.num_trained_tokens,
            "batch/max_sequence_len": self.max_sequence_len,
        }


@dataclass(frozen=True)
class _Row:
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_log_probs: torch.Tensor
    has_old_log_probs: torch.Tensor
    temperature: float
    # Per-token inputs of the extra loss terms (atropos_verl.regularizers), same keys in every row.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _shift(values: np.ndarray) -> torch.Tensor:
    """Move per-token values one slot left (slot t describes token t+1); the last slot gets 0."""
    shifted = np.zeros(len(values), dtype=np.float32)
    shifted[:-1] = values[1:]
    return torch.from_numpy(shifted)


@dataclass(frozen=True)
class _Extras:
    """Which extra per-token inputs the batch carries: reference log-probs, and the teacher's top-k width."""

    reference: bool
    top_k: int

    @classmethod
    def of(cls, groups: list[ScoredGroup], reference: bool) -> _Extras:
        top_k = max(
            (len(top) for g in groups if g.distill_token_ids for seq in g.distill_token_ids for top in seq), default=0
        )
        return cls(reference or any(g.ref_logprobs is not None for g in groups), top_k)

    def row(self, group: ScoredGroup, i: int) -> dict[str, torch.Tensor]:
        length = len(group.tokens[i])
        extras = {}
        if self.reference:
            if group.ref_logprobs is not None:
                extras["ref_log_probs"] = _shift(np.asarray(group.ref_logprobs[i], dtype=np.float32))
                extras["has_ref_log_probs"] = torch.ones(length)
            else:
                extras["ref_log_probs"] = extras["has_ref_log_probs"] = torch.zeros(length)
        if self.top_k:
            ids = np.full((length, self.top_k), -1, dtype=np.int64)
            logprobs = np.zeros((length, self.top_k), dtype=np.float32)
            if group.distill_token_ids is not None:
                # Slot t holds the teacher's distribution for token t+1.
                for t in range(1, length):
                    top = group.distill_token_ids[i][t]
                    ids[t - 1, : len(top)] = top
                    logprobs[t - 1, : len(top)] = group.distill_logprobs[i][t]
            extras["distill_token_ids"] = torch.from_numpy(ids.reshape(-1))
            extras["distill_logprobs"] = torch.from_numpy(logprobs.reshape(-1))
        return extras

    def padding(self, template: _Row) -> dict[str, torch.Tensor]:
        """Zero-weight values for a padding row shaped like ``template``: no reference, no teacher."""
        extras = {key: torch.zeros_like(value) for key, value in template.extras.items()}
        if "distill_token_ids" in extras:
            extras["distill_token_ids"] -= 1
        return extras


def _rows(
    group: ScoredGroup,
    advantages: list[np.ndarray],
    reduction: str,
    use_temperature: bool,
    extras: _Extras = _Extras(False, 0),
) -> list[_Row]:
    rows = []
    for i, tokens in enumerate(group.tokens):
        trained = (np.asarray(group.masks[i]) != IGNORED).astype(np.float32)
        trained[0] = 0.0
        if reduction == "sequence-mean":
            trained = trained / max(trained.sum(), 1.0)
        if group.inference_logprobs is not None:
            old = _shift(np.asarray(group.inference_logprobs[i], dtype=np.float32))
            has_old = torch.ones(len(tokens))
        else:
            old = torch.zeros(len(tokens))
            has_old = torch.zeros(len(tokens))
        rows.append(
            _Row(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                loss_mask=_shift(trained),
                advantages=_shift(advantages[i]),
                old_log_probs=old,
                has_old_log_probs=has_old,
                temperature=group.temperatures[i] if use_temperature else 1.0,
                extras=extras.row(group, i),
            )
        )
    return rows


def _padding_row(template: _Row, extras: _Extras) -> _Row:
    zeros = torch.zeros_like(template.loss_mask)
    return _Row(template.input_ids, zeros, zeros, zeros, zeros, 1.0, extras.padding(template))


def _jagged(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(tensors, layout=torch.jagged)


def _pack(rows: list[_Row], pad_to_multiple: int, extras: _Extras = _Extras(False, 0)) -> tuple[TensorDict, BatchStats]:
    """Rows (padded to a multiple of ``pad_to_multiple``) as verl's no-padding TensorDict."""
    if not rows:
        raise ValueError("cannot build a batch from zero sequences")
    num_real = len(rows)
    shortest = min(rows, key=lambda r: len(r.input_ids))
    rows = rows + [_padding_row(shortest, extras)] * (-num_real % pad_to_multiple)

    stats = BatchStats(
        num_sequences=num_real,
        num_padding_sequences=len(rows) - num_real,
        num_tokens=sum(len(r.input_ids) for r in rows[:num_real]),
        num_trained_tokens=int(sum(int((r.loss_mask > 0).sum()) for r in rows[:num_real])),
        max_sequence_len=max(len(r.input_ids) for r in rows),
    )
    tensors = {
        "input_ids": _jagged([r.input_ids for r in rows]),
        "position_ids": _jagged([torch.arange(len(r.input_ids)) for r in rows]),
        "loss_mask": _jagged([r.loss_mask for r in rows]),
        "advantages": _jagged([r.advantages for r in rows]),
        "old_log_probs": _jagged([r.old_log_probs for r in rows]),
        "has_old_log_probs": _jagged([r.has_old_log_probs for r in rows]),
        **{key: _jagged([r.extras[key] for r in rows]) for key in rows[0].extras},
    }
    temperatures = [r.temperature for r in rows]
    # A scalar 1.0 lets the engine skip dividing the (tokens x vocab) logits.
    if all(t == 1.0 for t in temperatures):
        non_tensors = {"temperature": 1.0}
    else:
        tensors["temperature"] = torch.tensor(temperatures, dtype=torch.float32)
        non_tensors = {}
    if extras.top_k:
        non_tensors["distill_top_k"] = extras.top_k
    return tu.get_tensordict(tensor_dict=tensors, non_tensor_dict=non_tensors), stats


def build_batch(
    groups: list[ScoredGroup],
    advantages: list[list[np.ndarray]],
    *,
    reduction: str,
    use_sampling_temperature: bool,
    pad_to_multiple: int,
    reference_log_probs: bool = False,
) -> tuple[TensorDict, BatchStats]:
    """Pack groups into verl's no-padding TensorDict for a training step (layout: module docstring).

    ``reference_log_probs``: carry ``ref_log_probs`` even when no group sends them (a hosted
    reference fills them in, atropos_verl.policy.reference).
    """
    extras = _Extras.of(groups, reference_log_probs)
    rows = [
        row
        for group, adv in zip(groups, advantages)
        for row in _rows(group, adv, reduction, use_sampling_temperature, extras)
    ]
    return _pack(rows, pad_to_multiple, extras)


def pack_sequences(sequences: list[list[int]], pad_to_multiple: int) -> TensorDict:
    """Token sequences as a forward-only batch (log-probs at temperature 1, no loss), same layout."""
    rows = []
    for tokens in sequences:
        zeros = torch.zeros(len(tokens))
        rows.append(_Row(torch.tensor(tokens, dtype=torch.long), torch.ones(len(tokens)), zeros, zeros, zeros, 1.0))
    batch, _ = _pack(rows, pad_to_multiple)
    tu.assign_non_tensor(batch, compute_loss=False, global_token_num=batch["input_ids"].offsets().diff().tolist())
    return batch
