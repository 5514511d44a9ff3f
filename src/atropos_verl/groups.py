"""Scored groups as the Atropos API hands them out, validated field by field.

A group is ``[sequence][position]``: ``tokens`` (prompt + completion ids),
``masks`` (-100 = not trained, anywhere in the sequence), one ``score`` per
sequence, and optional token-level ``advantages`` and ``inference_logprobs``
aligned with ``tokens``. Environments send ``[]`` for optional lists they do
not fill (BaseEnv's default ``collect_trajectories`` does), so an empty list
means "absent" here.

:func:`parse_group` turns one raw dict into a :class:`ScoredGroup` or raises
:class:`GroupRejected` naming the group, the field and the reason, so that a
bad group is counted and skipped instead of crashing or being silently cut.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

logger = logging.getLogger(__name__)

IGNORED = -100


class GroupRejected(ValueError):
    def __init__(self, group_id: str, field: str, reason: str):
        super().__init__(f"group {group_id}: {field}: {reason}")
        self.group_id = group_id
        self.field = field
        self.reason = reason


class _RawGroup(BaseModel):
    """Field types of a scored group; cross-field rules live in :func:`parse_group`."""

    model_config = ConfigDict(extra="allow", strict=False)

    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float]
    advantages: Optional[list[list[float]]] = None
    inference_logprobs: Optional[list[list[float]]] = None
    overrides: Optional[list[Optional[dict[str, Any]]]] = None
    group_overrides: Optional[dict[str, Any]] = None
    generation_params: Optional[dict[str, Any]] = None
    env_id: Optional[int] = None


@dataclass(frozen=True)
class ScoredGroup:
    group_id: str
    env_id: Optional[int]
    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float]
    advantages: Optional[list[list[float]]]
    inference_logprobs: Optional[list[list[float]]]
    # Per sequence: sampling temperature, forced zero advantage, train as SFT (advantage 1).
    temperatures: list[float]
    zero_advantage: list[bool]
    sft: list[bool]
    # Numbers an environment reports about the group (``group_overrides["metrics"]``),
    # e.g. answer correctness and format separately; the trainer logs their means as env/<name>.
    env_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclass(frozen=True)
class GroupLimits:
    vocab_size: int
    max_token_len: int


def _first_error(exc: ValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"]) or "group"
    return location, error["msg"]


def _present(values: Optional[list]) -> bool:
    return bool(values)


def _check_aligned(name: str, values: list[list[float]], tokens: list[list[int]], group_id: str) -> None:
    if len(values) != len(tokens):
        raise GroupRejected(group_id, name, f"{len(values)} sequences but tokens has {len(tokens)}")
    for i, (row, toks) in enumerate(zip(values, tokens)):
        if len(row) != len(toks):
            raise GroupRejected(group_id, f"{name}[{i}]", f"length {len(row)} != tokens[{i}] length {len(toks)}")
        for t, value in enumerate(row):
            if not math.isfinite(value):
                raise GroupRejected(group_id, f"{name}[{i}][{t}]", f"not finite ({value})")


def _temperature(raw: _RawGroup, override: dict[str, Any], i: int, group_id: str) -> float:
    value = override.get("temperature")
    field = f"overrides[{i}].temperature"
    if value is None and raw.generation_params:
        value = raw.generation_params.get("temperature")
        field = "generation_params.temperature"
    if value is None:
        return 1.0
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise GroupRejected(group_id, field, f"not a number: {value!r}") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise GroupRejected(group_id, field, f"must be a finite number > 0, got {value!r}")
    return temperature


def parse_group(raw: Any, group_id: str, limits: GroupLimits) -> ScoredGroup:
    """Validate one raw group from ``/batch``; raise :class:`GroupRejected` on the first problem."""
    if not isinstance(raw, dict):
        raise GroupRejected(group_id, "group", f"expected a JSON object, got {type(raw).__name__}")
    try:
        group = _RawGroup.model_validate(raw)
    except ValidationError as exc:
        field, message = _first_error(exc)
        raise GroupRejected(group_id, field, message) from None

    tokens, masks, scores = group.tokens, group.masks, group.scores
    if not tokens:
        raise GroupRejected(group_id, "tokens", "group has no sequences")
    if len(masks) != len(tokens):
        raise GroupRejected(group_id, "masks", f"{len(masks)} sequences but tokens has {len(tokens)}")
    if len(scores) != len(tokens):
        raise GroupRejected(group_id, "scores", f"{len(scores)} scores for {len(tokens)} sequences")

    trainable = 0
    for i, (toks, mask) in enumerate(zip(tokens, masks)):
        if len(toks) < 2:
            raise GroupRejected(group_id, f"tokens[{i}]", f"length {len(toks)}: a sequence needs at least 2 tokens")
        if len(toks) > limits.max_token_len:
            raise GroupRejected(
                group_id, f"tokens[{i}]", f"length {len(toks)} exceeds max_token_len {limits.max_token_len}"
            )
        if len(mask) != len(toks):
            raise GroupRejected(group_id, f"masks[{i}]", f"length {len(mask)} != tokens[{i}] length {len(toks)}")
        low, high = min(toks), max(toks)
        if low < 0 or high >= limits.vocab_size:
            bad = low if low < 0 else high
            raise GroupRejected(
                group_id, f"tokens[{i}]", f"token id {bad} outside the vocabulary [0, {limits.vocab_size})"
            )
        # Position 0 has no preceding context, so it is never trained.
        trainable += sum(1 for m in mask[1:] if m != IGNORED)
    if trainable == 0:
        raise GroupRejected(group_id, "masks", "every position is masked (-100): nothing to train on")

    for i, score in enumerate(scores):
        if not math.isfinite(score):
            raise GroupRejected(group_id, f"scores[{i}]", f"not finite ({score})")

    advantages = group.advantages if _present(group.advantages) else None
    if advantages is not None:
        _check_aligned("advantages", advantages, tokens, group_id)
    inference_logprobs = group.inference_logprobs if _present(group.inference_logprobs) else None
    if inference_logprobs is not None:
        _check_aligned("inference_logprobs", inference_logprobs, tokens, group_id)

    overrides = group.overrides if _present(group.overrides) else None
    if overrides is not None and len(overrides) != len(tokens):
        raise GroupRejected(group_id, "overrides", f"{len(overrides)} entries for {len(tokens)} sequences")
    per_sequence = [(overrides[i] or {}) if overrides else {} for i in range(len(tokens))]

    return ScoredGroup(
        group_id=group_id,
        env_id=group.env_id,
        tokens=tokens,
        masks=masks,
        scores=scores,
        advantages=advantages,
        inference_logprobs=inference_logprobs,
        temperatures=[_temperature(group, o, i, group_id) for i, o in enumerate(per_sequence)],
        zero_advantage=[bool(o.get("set_advantage_to_zero", False)) for o in per_sequence],
        sft=[bool(o.get("sft", False)) for o in per_sequence],
        env_metrics=_env_metrics(group.group_overrides),
    )


def _env_metrics(group_overrides: Optional[dict[str, Any]]) -> dict[str, float]:
    """Finite numbers under ``group_overrides["metrics"]``; anything else there is ignored, not fatal."""
    reported = (group_overrides or {}).get("metrics")
    if not isinstance(reported, dict):
        return {}
    return {
        str(key): float(value)
        for key, value in reported.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def describe(raw: Any, index: int, step: int) -> str:
    """A stable id for log lines: env, trainer step and position in the batch."""
    env = raw.get("env_id") if isinstance(raw, dict) else None
    return f"env={env if env is not None else '?'}/step={step}/group={index}"


@dataclass
class ValidatedBatch:
    groups: list[ScoredGroup]
    rejected: list[GroupRejected]


def validate_batch(raw_groups: list[Any], step: int, limits: GroupLimits) -> ValidatedBatch:
    """Every group of one ``/batch`` answer parsed; the rejected ones logged with their reason."""
    groups, rejected = [], []
    for index, raw in enumerate(raw_groups):
        group_id = describe(raw, index, step)
        try:
            groups.append(parse_group(raw, group_id, limits))
        except GroupRejected as rejection:
            logger.warning("rejected %s", rejection)
            rejected.append(rejection)
    return ValidatedBatch(groups, rejected)
