"""Loss terms besides the policy gradient: KL to a reference policy, on-policy distillation, an entropy bonus.

All three read what Atropos environments send with a group, carried per token in the
batch's shifted layout (slot t describes token t+1, see :mod:`atropos_verl.batch`), and
are weighted by the same ``loss_mask`` weights and normaliser as the policy term, so
``loss = policy_coef * policy + kl_loss_coef * KL + distill_coef * D - entropy_coeff * H``
reduces every term the same way (token-mean, sequence-mean or sum).

KL to a reference (verl's ``use_kl_loss`` / ``kl_loss_coef`` / ``kl_loss_type``)
    From the env's ``ref_logprobs`` (log-probs of each token under a reference model).
    Estimators, with ``d = logp - ref_logp`` per sampled token (J. Schulman, "Approximating
    KL divergence", 2020): ``k1``/``kl`` = d, ``abs`` = |d|, ``k2``/``mse`` = d²/2,
    ``k3``/``low_var_kl`` = e^{-d} + d - 1 (log-ratio clamped to ±20, value to ±10, as verl).
    A ``+`` suffix (``k3+``) keeps the estimator's value with k2's gradient, whose
    expectation is the gradient of the KL. Tokens of sequences sent without ``ref_logprobs``
    carry no KL term (this trainer hosts no reference model).

On-policy distillation (``distill_coef``, ``distill_direction``)
    From ``distill_token_ids`` / ``distill_logprobs`` ``[seq][pos][top_k]``: the teacher's
    top-k tokens for the token at each position. Both distributions are renormalised on that
    support S: ``p̃ = softmax_S(teacher logprobs)``, ``q̃ = softmax_S(student logits at S)``.
    ``forward`` is KL(p̃ ‖ q̃) = Σ_S p̃ (log p̃ - log q̃): the student covers the teacher's
    top-k (mass-covering, the usual distillation cross-entropy up to a constant);
    ``reverse`` is KL(q̃ ‖ p̃) = Σ_S q̃ (log q̃ - log p̃): mode-seeking. Renormalising means only
    the student's odds *within* S are trained; its mass outside S gets no gradient from this
    term (the policy term and sampling still see it). Only the K logits at S are gathered.

Entropy (``entropy_coeff``, ``calculate_entropy``)
    Full-vocabulary entropy at trained positions, chunked so the extra memory is one
    chunk x vocab block (as :mod:`atropos_verl.policy.logprobs`).

Student quantities use the logits the log-probs use: divided by the sequence's sampling
temperature when ``loss.use_sampling_temperature`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from verl.utils import tensordict_utils as tu

from atropos_verl.config import DISTILL_DIRECTIONS, KL_LOSS_TYPES
from atropos_verl.logit_chunks import CHUNK_BYTES, rows_per_chunk

# Stands in for the log-prob of a padded top-k slot: exp() of it is exactly 0 in float32,
# and it stays finite, so no NaN reaches a gradient through where().
_ABSENT = -1e9


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from sampled tokens' log-probs (names as verl's)."""
    base = kl_type[:-1] if kl_type.endswith("+") else kl_type
    log_ratio = logp - ref_logp
    if base in ("k1", "kl"):
        value = log_ratio
    elif base == "abs":
        value = log_ratio.abs()
    elif base in ("k2", "mse"):
        value = 0.5 * log_ratio.square()
    elif base in ("k3", "low_var_kl"):
        log_r = torch.clamp(-log_ratio, min=-20.0, max=20.0)
        value = torch.clamp(torch.exp(log_r) - log_r - 1.0, min=-10.0, max=10.0)
    else:
        raise ValueError(f"kl_loss_type must be one of {KL_LOSS_TYPES}, got {kl_type!r}")
    if kl_type.endswith("+"):
        surrogate = 0.5 * log_ratio.square()
        value = surrogate - surrogate.detach() + value.detach()
    return value


def topk_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, direction: str) -> torch.Tensor:
    """KL on the renormalised top-k support per position (module docstring), shape ``student.shape[:-1]``.

    ``student``: the student's logits (or log-probs: a constant per row cancels) at the
    teacher's ids; ``teacher``: the teacher's log-probs there; ``valid``: False at padded slots.
    A position without a valid slot gets 0.
    """
    if direction not in DISTILL_DIRECTIONS:
        raise ValueError(f"distill direction must be one of {DISTILL_DIRECTIONS}, got {direction!r}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    student = torch.where(valid, student.to(dtype), _ABSENT)
    teacher = torch.where(valid, teacher.to(dtype), _ABSENT)
    log_q = student - torch.logsumexp(student, dim=-1, keepdim=True)
    log_p = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    if direction == "forward":
        per_slot = log_p.exp() * (log_p - log_q)
    else:
        per_slot = log_q.exp() * (log_q - log_p)
    return torch.where(valid, per_slot, 0.0).sum(dim=-1)


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(logits[positions]) per position, chunked over positions."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, positions: torch.Tensor, chunk_rows: int):
        count = positions.numel()
        entropy = torch.empty(count, dtype=torch.float32, device=logits.device)
        log_normalizer = torch.empty(count, dtype=torch.float32, device=logits.device)
        for start in range(0, count, chunk_rows):
            end = min(start + chunk_rows, count)
            chunk = logits.index_select(0, positions[start:end]).float()
            lse = torch.logsumexp(chunk, dim=-1)
            log_normalizer[start:end] = lse
            entropy[start:end] = lse - (torch.softmax(chunk, dim=-1) * chunk).sum(dim=-1)
        ctx.save_for_backward(logits, positions, log_normalizer, entropy)
        ctx.chunk_rows = chunk_rows
        return entropy

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, positions, log_normalizer, entropy = ctx.saved_tensors
        # dH/dz = -p * (log p + H)
        grad = torch.zeros_like(logits)
        grad_output = grad_output.float()
        for start in range(0, positions.numel(), ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, positions.numel())
            rows = positions[start:end]
            log_p = logits.index_select(0, rows).float() - log_normalizer[start:end].unsqueeze(-1)
            chunk = log_p.exp().mul_(log_p + entropy[start:end].unsqueeze(-1)).mul_(-grad_output[start:end, None])
            grad.index_copy_(0, rows, chunk.to(grad.dtype))
        return grad, None, None


def token_entropy(logits: torch.Tensor, positions: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Entropy (float32) of ``softmax(logits[p])`` for each row index p of ``positions`` (``logits``: (rows, V))."""
    return _Entropy.apply(logits, positions, rows_per_chunk(logits.shape[-1], chunk_bytes))


@dataclass(frozen=True)
class Regularizers:
    """The extra terms' settings (from :class:`atropos_verl.config.LossConfig`)."""

    policy_coef: float = 1.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    distill_coef: float = 0.0
    distill_direction: str = "forward"
    entropy_coeff: float = 0.0
    calculate_entropy: bool = False

    @classmethod
    def from_config(cls, loss: Any) -> Regularizers:
        return cls(
            policy_coef=loss.policy_coef,
            use_kl_loss=loss.use_kl_loss,
            kl_loss_coef=loss.kl_loss_coef,
            kl_loss_type=loss.kl_loss_type,
            distill_coef=loss.distill_coef,
            distill_direction=loss.distill_direction,
            entropy_coeff=loss.entropy_coeff,
            calculate_entropy=loss.calculate_entropy,
        )

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coeff > 0 or self.calculate_entropy


# Model-output keys filled by :func:`logit_outputs`, and the batch's flag asking for entropy.
ENTROPY = "entropy"
DISTILL_STUDENT = "distill_student_logits"
COMPUTE_ENTROPY = "compute_entropy"


@dataclass(frozen=True)
class LogitInputs:
    """Host-side indices for :func:`logit_outputs`, taken from a micro-batch before it moves to the device."""

    trained: torch.Tensor  # packed slots with a loss weight
    positions: torch.Tensor  # their rows in the flattened (padded) logits
    distill_ids: Optional[torch.Tensor]  # (len(trained), K), -1 at padded slots
    entropy: bool

    def to(self, device: torch.device) -> LogitInputs:
        ids = None if self.distill_ids is None else self.distill_ids.to(device)
        return LogitInputs(self.trained.to(device), self.positions.to(device), ids, self.entropy)


def logit_inputs(micro_batch, slots: Optional[torch.Tensor]) -> Optional[LogitInputs]:
    """What the regularizers need from the logits of ``micro_batch``, or None when they need nothing.

    ``slots``: the flat padded position of each packed slot (None when packed = padded).
    """
    entropy = bool(tu.get_non_tensor_data(micro_batch, COMPUTE_ENTROPY, False))
    distill = "distill_token_ids" in micro_batch.keys()
    if not entropy and not distill:
        return None
    trained = (micro_batch["loss_mask"].values() > 0).nonzero().squeeze(1)
    positions = trained if slots is None else slots.index_select(0, trained)
    ids = None
    if distill:
        top_k = int(tu.get_non_tensor_data(micro_batch, "distill_top_k", 0))
        ids = micro_batch["distill_token_ids"].values().view(-1, top_k).index_select(0, trained)
    return LogitInputs(trained, positions, ids, entropy)


def logit_outputs(logits: torch.Tensor, inputs: LogitInputs, num_slots: int) -> dict[str, torch.Tensor]:
    """Entropy and the student's logits at the teacher's ids, packed (zeros at untrained slots)."""
    flat = logits.reshape(-1, logits.shape[-1])
    outputs = {}
    if inputs.entropy:
        entropy = token_entropy(flat, inputs.positions)
        outputs[ENTROPY] = entropy.new_zeros(num_slots).index_copy(0, inputs.trained, entropy)
    if inputs.distill_ids is not None:
        ids = inputs.distill_ids.clamp_min(0)
        # One gather of K values per position from the flat logits: no (positions, V) copy.
        index = inputs.positions.unsqueeze(1) * flat.shape[-1] + ids
        student = flat.reshape(-1).take(index.reshape(-1)).view_as(ids)
        student = student.to(torch.promote_types(student.dtype, torch.float32))
        outputs[DISTILL_STUDENT] = student.new_zeros(num_slots, ids.shape[1]).index_copy(0, inputs.trained, student)
    return outputs


def regularizer_terms(
    logp: torch.Tensor,
    model_output: dict,
    data,
    weight: torch.Tensor,
    loss_scale: float,
    share: float,
    terms: Regularizers,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The extra terms' loss (already scaled like the policy term's) and their metric shares.

    ``weight``: the loss-mask weights; ``loss_scale`` turns a weighted sum into this micro-batch's
    share of the reduction; ``share`` does the same for metrics (a weighted mean over the
    mini-batch once summed over micro-batches). Metric means whose weight is not the whole
    mask come as a (value share, weight share) pair that the driver divides.
    """
    loss = logp.new_zeros(())
    metrics: dict[str, torch.Tensor] = {}
    detached = logp.detach()
    with torch.no_grad():
        sampled = weight * data["has_old_log_probs"].values().to(weight.dtype)
        old_logp = data["old_log_probs"].values().to(logp.dtype)
        # verl's ppo_kl: mean of old - new log-prob over tokens the sampler reported.
        metrics["actor/ppo_kl_share"] = ((old_logp - detached) * sampled).sum() * share
        metrics["actor/ppo_kl_weight_share"] = sampled.sum() * share

    if "ref_log_probs" in data.keys():
        ref_weight = weight * data["has_ref_log_probs"].values().to(weight.dtype)
        kl = kl_estimate(logp, data["ref_log_probs"].values().to(logp.dtype), terms.kl_loss_type)
        kl = torch.where(ref_weight > 0, kl, 0.0)
        if terms.use_kl_loss:
            loss = loss + terms.kl_loss_coef * (kl * ref_weight).sum() * loss_scale
        metrics["actor/kl_loss_share"] = (kl.detach() * ref_weight).sum() * share
        metrics["actor/ref_weight_share"] = ref_weight.sum().detach() * share

    if DISTILL_STUDENT in model_output:
        student = model_output[DISTILL_STUDENT]
        top_k = student.shape[-1]
        ids = data["distill_token_ids"].values().view(-1, top_k)
        teacher = data["distill_logprobs"].values().view(-1, top_k)
        valid = ids >= 0
        distill_weight = weight * valid.any(dim=-1).to(weight.dtype)
        divergence = torch.where(distill_weight > 0, topk_kl(student, teacher, valid, terms.distill_direction), 0.0)
        if terms.distill_coef > 0:
            loss = loss + terms.distill_coef * (divergence * distill_weight).sum() * loss_scale
        metrics["actor/distill_kl_share"] = (divergence.detach() * distill_weight).sum() * share
        metrics["actor/distill_weight_share"] = distill_weight.sum().detach() * share

    if ENTROPY in model_output:
        entropy = torch.where(weight > 0, model_output[ENTROPY], 0.0)
        if terms.entropy_coeff > 0:
            loss = loss - terms.entropy_coeff * (entropy * weight).sum() * loss_scale
        metrics["actor/entropy"] = (entropy.detach() * weight).sum() * share
    return loss, metrics


# (metric, value share, weight share) pairs that Actor.train turns into means.
RATIO_METRICS = (
    ("actor/ppo_kl", "actor/ppo_kl_share", "actor/ppo_kl_weight_share"),
    ("actor/kl_loss", "actor/kl_loss_share", "actor/ref_weight_share"),
    ("actor/distill_kl", "actor/distill_kl_share", "actor/distill_weight_share"),
)
