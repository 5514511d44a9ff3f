"""The advantage-weighted token loss: cross-entropy per token × advantage × loss mask.

Alignment follows Atropos: ``advantages[b, t]`` and ``loss_mask[b, t]`` belong to
token ``input_ids[b, t]``, which is predicted by ``logits[b, t-1]``; position 0
has no prediction and is never trained. With ``logp[b, t] = log p(input_ids[b, t] | < t)``
the per-token objective is ``-A[b, t] * logp[b, t]`` and the default reduction is

    token-mean = Σ(-A·m·logp) / Σm

Two entry points share :func:`token_objective`:

* :func:`advantage_weighted_token_loss` — the public, framework-free function on
  ``(B, T, V)`` logits.
* :func:`verl_policy_loss` — the same objective as a verl ``TrainingWorker`` loss
  (``set_loss_fn``), on the engine's packed log-probs, normalised over the whole
  mini-batch across micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from atropos_verl.regularizers import Regularizers, regularizer_terms

REDUCTIONS = ("token-mean", "sequence-mean", "sum")


def token_objective(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: Optional[torch.Tensor] = None,
    clip_ratio: Optional[float] = None,
) -> torch.Tensor:
    """Per-token loss, same shape as ``logp``.

    Without ``clip_ratio`` this is ``-A * logp``. With it, the PPO clipped
    surrogate ``-min(r*A, clip(r, 1-ε, 1+ε)*A)`` with ``r = exp(logp - old_logp)``;
    where ``old_logp`` equals ``logp`` (on-policy) its gradient is that of ``-A * logp``.
    """
    if clip_ratio is None:
        return -advantages * logp
    if old_logp is None:
        old_logp = logp.detach()
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
    return -torch.minimum(unclipped, clipped)


def advantage_weighted_token_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: str = "token-mean",
) -> torch.Tensor:
    """Advantage-weighted cross-entropy over tokens; returns a scalar to backpropagate.

    Args:
        logits: ``(B, T, V)`` model outputs; ``logits[b, t]`` predicts ``input_ids[b, t+1]``.
        input_ids: ``(B, T)`` token ids.
        advantages: ``(B, T)`` advantage of each token ``input_ids[b, t]``.
        loss_mask: ``(B, T)`` 1 where token ``input_ids[b, t]`` is trained, 0 elsewhere
            (Atropos ``masks != -100``); masked tokens get exactly zero gradient.
        reduction: ``token-mean`` (Σ(-A·m·logp)/Σm), ``sequence-mean`` (mean over
            sequences with a trained token of each one's token mean) or ``sum``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and input_ids (B, T); got {tuple(logits.shape)}, {tuple(input_ids.shape)}"
        )
    if advantages.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and loss_mask {tuple(loss_mask.shape)} "
            f"must match input_ids {tuple(input_ids.shape)}"
        )
    targets = input_ids[:, 1:]
    # cross_entropy fuses log-softmax and gather without keeping a (B, T, V) log-prob copy.
    logp = -F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    mask = loss_mask[:, 1:].to(logp.dtype)
    # where() rather than a product alone: a masked token must not leak NaN/inf into the gradient.
    per_token = torch.where(mask > 0, token_objective(logp, advantages[:, 1:].to(logp.dtype)), 0.0) * mask
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token-mean":
        return per_token.sum() / mask.sum().clamp_min(1.0)
    per_sequence_tokens = mask.sum(dim=1)
    trained = per_sequence_tokens > 0
    per_sequence = per_token.sum(dim=1)[trained] / per_sequence_tokens[trained]
    return per_sequence.sum() / trained.sum().clamp_min(1)


# --- rollout correction: importance weights between the sampler and the trainer ---------------
#
# The sampler's log-probs (the env's ``inference_logprobs``) come from an older policy
# and another engine; the trainer's, before the update, are the current policy's. Their
# ratio ``r = exp(logp_trainer - logp_sampler)`` per token, or its product over a
# sequence, weights each token's objective (detached: the weight changes the measure,
# not the objective), truncated above a threshold or zeroed outside bounds, and
# rejection options zero whole tokens or sequences whose divergence is too large.
# Names follow verl's ``algorithm.rollout_correction`` where the meaning is the same.

# exp() of a larger log-ratio overflows float32; beyond it a weight is "huge" anyway.
_LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class Rejection:
    """One ``rollout_rs`` option: k1 keeps a ratio in [lower, upper], k2/k3 a divergence <= upper."""

    option: str
    upper: float
    lower: Optional[float] = None


@dataclass(frozen=True)
class RolloutCorrection:
    """Parsed ``rollout_correction`` settings (see :class:`atropos_verl.config.RolloutCorrectionConfig`)."""

    rollout_is: Optional[str] = None
    is_upper: float = 2.0
    # Set: weights outside [is_lower, is_upper] are zeroed (masked) instead of truncated at is_upper.
    is_lower: Optional[float] = None
    rejections: tuple[Rejection, ...] = ()


def _sequence_reduce(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int, how: str) -> torch.Tensor:
    """Per-sequence sum / mean / max of the token values (already zero or -inf where not counted)."""
    if how == "max":
        out = torch.full((num_sequences,), float("-inf"), dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, sequence_ids, values, reduce="amax")
    return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, sequence_ids, values)


def _divergence(log_ratio: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - 1.0 - log_ratio


def _rejection_keep(
    rejection: Rejection,
    log_ratio: torch.Tensor,
    corrected: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
) -> torch.Tensor:
    """1.0 for tokens ``rejection`` keeps, 0.0 for the rejected (a sequence option rejects whole sequences)."""
    level, kind = rejection.option.rsplit("_", 1)
    per_token = torch.where(corrected, _divergence(log_ratio, kind), 0.0)
    if level == "token":
        statistic = per_token
    else:
        how = level.removeprefix("seq_")
        counted = per_token if how != "max" else torch.where(corrected, per_token, float("-inf"))
        per_sequence = _sequence_reduce(counted, sequence_ids, num_sequences, how)
        if how == "mean":
            tokens = _sequence_reduce(corrected.to(log_ratio.dtype), sequence_ids, num_sequences, "sum")
            per_sequence = per_sequence / tokens.clamp_min(1.0)
        statistic = per_sequence[sequence_ids]
    if kind == "k1":
        # k1 bounds the ratio itself (the statistic is its log).
        assert rejection.lower is not None
        keep = (statistic >= math.log(rejection.lower)) & (statistic <= math.log(rejection.upper))
    else:
        keep = statistic <= rejection.upper
    return keep.to(log_ratio.dtype)


def rollout_correction_weights(
    log_ratio: torch.Tensor,
    corrected: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
    correction: RolloutCorrection,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token multipliers of the objective (1 where not ``corrected``) and per-token statistics.

    Args:
        log_ratio: ``logp_trainer - logp_sampler`` per token of the packed batch (detached).
        corrected: bool, the trained tokens that have sampler log-probs.
        sequence_ids: the sequence each token belongs to, in ``[0, num_sequences)``.
    Returns the weights and, per token, ``raw`` (the untruncated IS weight), ``truncated`` and
    ``masked`` (0/1), for the caller to reduce over the tokens it counts.
    """
    log_ratio = torch.where(corrected, log_ratio, 0.0).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ones = torch.ones_like(log_ratio)
    if correction.rollout_is == "sequence":
        per_sequence = _sequence_reduce(log_ratio, sequence_ids, num_sequences, "sum")
        raw = torch.exp(per_sequence.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))[sequence_ids]
    else:
        raw = torch.exp(log_ratio)
    truncated = torch.zeros_like(log_ratio)
    masked = torch.zeros_like(log_ratio)
    if correction.rollout_is is None:
        weights = ones
    elif correction.is_lower is None:
        truncated = (raw > correction.is_upper).to(raw.dtype)
        weights = raw.clamp(max=correction.is_upper)
    else:
        inside = (raw >= correction.is_lower) & (raw <= correction.is_upper)
        masked = (~inside).to(raw.dtype)
        weights = torch.where(inside, raw, 0.0)
    for rejection in correction.rejections:
        keep = _rejection_keep(rejection, log_ratio, corrected, sequence_ids, num_sequences)
        masked = torch.maximum(masked, 1.0 - keep)
        weights = weights * keep
    weights = torch.where(corrected, weights, 1.0)
    return weights, {"raw": raw, "truncated": truncated * corrected, "masked": masked * corrected}


def verl_policy_loss(
    model_output,
    data,
    dp_group=None,
    *,
    reduction: str = "token-mean",
    clip_ratio=None,
    terms: Optional[Regularizers] = None,
    rollout_correction: Optional[RolloutCorrection] = None,
):
    """The objective as a verl ``TrainingWorker`` loss (bind the keywords with ``functools.partial``).

    The engine returns packed log-probs where slot ``t`` of a sequence holds
    ``log p(token t+1)``; the batch builder stores every per-token input in that
    shifted layout (``loss_mask``, ``advantages``, ``old_log_probs``), so here the
    tensors line up element-wise. ``loss_mask`` carries the reduction's weights
    (1 per trained token, or 1/n_i for sequence-mean) and verl sums it over the
    whole mini-batch on every data-parallel rank into ``batch_num_tokens``;
    dividing by it and multiplying by ``dp_size`` (FSDP averages gradients over
    ranks) makes the accumulated gradient exactly that of the global reduction.
    ``terms`` adds KL, distillation and entropy terms (atropos_verl.regularizers).
    """
    logp = model_output["log_probs"].values()
    weight = data["loss_mask"].values().to(logp.dtype)
    advantages = data["advantages"].values().to(logp.dtype)
    old_logp = data["old_log_probs"].values().to(logp.dtype)
    has_old = data["has_old_log_probs"].values().to(logp.dtype)
    # Sequences without inference log-probs are treated as exactly on-policy.
    old_logp = torch.where(has_old > 0, old_logp, logp.detach())

    per_token = token_objective(logp, advantages, old_logp, clip_ratio)
    corrected = (weight > 0) & (has_old > 0)
    log_ratio = torch.where(corrected, logp.detach() - old_logp, 0.0).float().clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    offsets = data["loss_mask"].offsets()
    lengths = offsets.diff()
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths).to(logp.device)
    is_weights, is_stats = rollout_correction_weights(
        log_ratio, corrected, sequence_ids, len(lengths), rollout_correction or RolloutCorrection()
    )
    per_token = per_token * is_weights.to(per_token.dtype)
    dp_size = float(data["dp_size"])
    batch_weight = max(float(data["batch_num_tokens"]), 1e-12)
    scale = dp_size if reduction == "sum" else dp_size / batch_weight
    loss = torch.where(weight > 0, per_token, 0.0).mul(weight).sum() * scale
    if terms is not None:
        extra_loss, extra_metrics = regularizer_terms(
            logp, model_output, data, weight, scale, dp_size / batch_weight, terms
        )
        loss = terms.policy_coef * loss + extra_loss

    # Metrics are weighted means over the mini-batch whatever the reduction: each
    # micro-batch reports its share (sum / global weight x dp_size), which verl's
    # SUM over micro-batches and mean over ranks turns into the global mean.
    # The log-prob gap to the sampler is a ratio of two such shares, formed on the driver.
    # They stay 0-d device tensors: the engine (atropos_verl.policy.fsdp_engine.read_back) fetches them
    # with the losses in one copy after every micro-batch's backward has been launched,
    # instead of stalling the GPU before each backward.
    with torch.no_grad():
        share = dp_size / batch_weight
        detached = logp.detach()
        sampled_weight = weight * has_old
        metrics = {
            "actor/logprob": (detached * weight).sum() * share,
            "actor/inference_logprob_abs_diff_share": ((detached - old_logp).abs() * sampled_weight).sum() * share,
            "actor/inference_logprob_weight_share": sampled_weight.sum() * share,
        }
        # The sampler/trainer mismatch, whether or not the correction is applied (verl's rollout_corr/ names).
        counted = sampled_weight.float()
        metrics.update(
            {
                "rollout_corr/kl_share": (-log_ratio * counted).sum() * share,
                "rollout_corr/k3_kl_share": ((torch.exp(log_ratio) - 1.0 - log_ratio) * counted).sum() * share,
                "rollout_corr/rollout_is_mean_share": (torch.where(corrected, is_weights, 0.0) * counted).sum() * share,
                "rollout_corr/rollout_is_truncated_fraction_share": (is_stats["truncated"] * counted).sum() * share,
                "rollout_corr/masked_fraction_share": (is_stats["masked"] * counted).sum() * share,
                # A max, not a share: the engine reduces "_max" metrics by max (no host sync here).
                "rollout_corr/rollout_is_max": torch.cat(
                    [torch.where(corrected, is_stats["raw"], 0.0), torch.zeros(1, device=logp.device)]
                ).max(),
            }
        )
        if clip_ratio is not None:
            outside = ((torch.exp(detached - old_logp) - 1.0).abs() > clip_ratio).to(weight.dtype)
            metrics["actor/clip_fraction"] = (outside * weight).sum() * share
    if terms is not None:
        metrics.update(extra_metrics)
    return loss, metrics
