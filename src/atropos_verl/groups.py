"""Scored groups as the Atropos API hands them out, validated field by field.

A group is ``[sequence][position]``: ``tokens`` (prompt + completion ids),
``masks`` (-100 = not trained, anywhere in the sequence), one ``score`` per
sequence, and optional token-level ``advantages`` and ``inference_logprobs``
aligned with ``tokens``, as are ``ref_logprobs``; ``distill_token_ids`` /
``distill_logprobs`` are ``[sequence][position][top_k]``. Environments send
``[]`` for optional lists they do not fill (BaseEnv's default
``collect_trajectories`` does), so an empty list means "absent" here.

:func:`parse_group` turns one raw dict into a :class:`ScoredGroup` or raises
:class:`GroupRejected` naming the group, the field and the reason, so that a
bad group is counted and skipped instead of crashing or being silently cut.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
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


# Bounds that keep every value finite through advantages and float32 packing: a score of
# 1e308 makes the group's mean overflow, a temperature of 1e-50 is 0.0 in float32.
MAX_ABS_SCORE = 1e6
MAX_ABS_ADVANTAGE = 1e6
MIN_LOGPROB = -1e4
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
# What the trainer reads from ``overrides[i]``; any other key is ignored (logged once).
OVERRIDE_KEYS = ("set_advantage_to_zero", "sft", "temperature")
# Fields atroposlib forwards that this trainer does not use yet (logged once when sent).
UNUSED_FIELDS = ("images",)
# Largest teacher top-k per position accepted (the batch carries tokens x top_k ids and log-probs).
MAX_DISTILL_TOP_K = 1024
_reported_unused: set[str] = set()


class _RawGroup(BaseModel):
    """Field types of a scored group; cross-field rules live in :func:`parse_group`.

    Strict: "5" is not a token id and "false" is not a boolean (``bool("false")`` is true).
    """

    model_config = ConfigDict(extra="allow", strict=True)

    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float]
    advantages: Optional[list[list[float]]] = None
    inference_logprobs: Optional[list[list[float]]] = None
    ref_logprobs: Optional[list[list[float]]] = None
    distill_token_ids: Optional[list[list[list[int]]]] = None
    distill_logprobs: Optional[list[list[list[float]]]] = None
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
    # Reference-model log-probs per token, aligned with tokens like inference_logprobs.
    ref_logprobs: Optional[list[list[float]]] = None
    # The teacher's top-k ids and log-probs for the token at each position ([seq][pos][k]);
    # an empty list at a position: no teacher there.
    distill_token_ids: Optional[list[list[list[int]]]] = None
    distill_logprobs: Optional[list[list[list[float]]]] = None

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


def _check_aligned(
    name: str,
    values: list[list[float]],
    tokens: list[list[int]],
    group_id: str,
    bounds: Callable[[bool], tuple[float, float]],
    masks: list[list[int]],
) -> None:
    """Rows aligned with ``tokens``; each value finite and within ``bounds(trained)`` for its position."""
    if len(values) != len(tokens):
        raise GroupRejected(group_id, name, f"{len(values)} sequences but tokens has {len(tokens)}")
    for i, (row, toks) in enumerate(zip(values, tokens)):
        if len(row) != len(toks):
            raise GroupRejected(group_id, f"{name}[{i}]", f"length {len(row)} != tokens[{i}] length {len(toks)}")
        for t, value in enumerate(row):
            if not math.isfinite(value):
                raise GroupRejected(group_id, f"{name}[{i}][{t}]", f"not finite ({value})")
            low, high = bounds(masks[i][t] != IGNORED)
            if not low <= value <= high:
                raise GroupRejected(group_id, f"{name}[{i}][{t}]", f"{value} outside [{low:g}, {high:g}]")


def _temperature(raw: _RawGroup, override: dict[str, Any], i: int, group_id: str) -> float:
    value = override.get("temperature")
    field = f"overrides[{i}].temperature"
    if value is None and raw.generation_params:
        value = raw.generation_params.get("temperature")
        field = "generation_params.temperature"
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GroupRejected(group_id, field, f"not a number: {value!r}"[:200])
    try:
        temperature = float(value)
    except OverflowError:
        raise GroupRejected(group_id, field, f"a {len(str(value))}-digit number is out of range") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise GroupRejected(group_id, field, f"must be a finite number > 0, got {value!r}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise GroupRejected(group_id, field, f"{temperature:g} outside [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    return temperature


def _flag(override: dict[str, Any], key: str, i: int, group_id: str) -> bool:
    value = override.get(key, False)
    if not isinstance(value, bool):
        raise GroupRejected(group_id, f"overrides[{i}].{key}", f"must be true or false, got {value!r}"[:200])
    return value


def _note_ignored(raw: dict[str, Any], overrides: list[dict[str, Any]]) -> None:
    """Log, once per field name and process, what an environment sends that the trainer ignores."""
    sent = [name for name in UNUSED_FIELDS if raw.get(name)]
    sent += [f"overrides.{key}" for override in overrides for key in override if key not in OVERRIDE_KEYS]
    for name in sent:
        if name not in _reported_unused:
            _reported_unused.add(name)
            logger.info("environments send %s, which this trainer does not use; it is ignored", name)


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
        if abs(score) > MAX_ABS_SCORE:
            raise GroupRejected(group_id, f"scores[{i}]", f"{score:g} outside [-{MAX_ABS_SCORE:g}, {MAX_ABS_SCORE:g}]")

    advantages = group.advantages if _present(group.advantages) else None
    if advantages is not None:
        _check_aligned("advantages", advantages, tokens, group_id, lambda _: _ADVANTAGE_BOUNDS, masks)
    inference_logprobs = group.inference_logprobs if _present(group.inference_logprobs) else None
    if inference_logprobs is not None:
        # Sampled tokens have log-probs <= 0; masked places carry a placeholder (atroposlib: 1.0).
        _check_aligned("inference_logprobs", inference_logprobs, tokens, group_id, _logprob_bounds, masks)

    ref_logprobs = group.ref_logprobs if _present(group.ref_logprobs) else None
    if ref_logprobs is not None:
        _check_aligned("ref_logprobs", ref_logprobs, tokens, group_id, _logprob_bounds, masks)
    distill_ids, distill_logprobs = _distillation(group, tokens, group_id, limits.vocab_size)

    overrides = group.overrides if _present(group.overrides) else None
    if overrides is not None and len(overrides) != len(tokens):
        raise GroupRejected(group_id, "overrides", f"{len(overrides)} entries for {len(tokens)} sequences")
    per_sequence = [(overrides[i] or {}) if overrides else {} for i in range(len(tokens))]
    _note_ignored(raw, per_sequence)

    return ScoredGroup(
        group_id=group_id,
        env_id=group.env_id,
        tokens=tokens,
        masks=masks,
        scores=scores,
        advantages=advantages,
        inference_logprobs=inference_logprobs,
        temperatures=[_temperature(group, o, i, group_id) for i, o in enumerate(per_sequence)],
        zero_advantage=[_flag(o, "set_advantage_to_zero", i, group_id) for i, o in enumerate(per_sequence)],
        sft=[_flag(o, "sft", i, group_id) for i, o in enumerate(per_sequence)],
        env_metrics=_env_metrics(group.group_overrides),
        ref_logprobs=ref_logprobs,
        distill_token_ids=distill_ids,
        distill_logprobs=distill_logprobs,
    )


def _distillation(
    group: _RawGroup, tokens: list[list[int]], group_id: str, vocab_size: int
) -> tuple[Optional[list], Optional[list]]:
    """The teacher's top-k, checked: [seq][pos][k] aligned with tokens, ids in the vocabulary and
    distinct per position, log-probs finite and <= 0; both fields or neither."""
    ids = group.distill_token_ids if _present(group.distill_token_ids) else None
    logprobs = group.distill_logprobs if _present(group.distill_logprobs) else None
    if ids is None and logprobs is None:
        return None, None
    if ids is None or logprobs is None:
        missing = "distill_token_ids" if ids is None else "distill_logprobs"
        given = "distill_logprobs" if ids is None else "distill_token_ids"
        raise GroupRejected(group_id, missing, f"missing while {given} is sent: the teacher needs both")
    for name, rows in (("distill_token_ids", ids), ("distill_logprobs", logprobs)):
        if len(rows) != len(tokens):
            raise GroupRejected(group_id, name, f"{len(rows)} sequences but tokens has {len(tokens)}")
    for i, (seq_ids, seq_logprobs, toks) in enumerate(zip(ids, logprobs, tokens)):
        for name, rows in (("distill_token_ids", seq_ids), ("distill_logprobs", seq_logprobs)):
            if len(rows) != len(toks):
                raise GroupRejected(group_id, f"{name}[{i}]", f"length {len(rows)} != tokens[{i}] length {len(toks)}")
        for t, (top_ids, top_logprobs) in enumerate(zip(seq_ids, seq_logprobs)):
            where = f"[{i}][{t}]"
            if len(top_ids) != len(top_logprobs):
                raise GroupRejected(
                    group_id, f"distill_logprobs{where}", f"{len(top_logprobs)} values for {len(top_ids)} token ids"
                )
            if len(top_ids) > MAX_DISTILL_TOP_K:
                raise GroupRejected(
                    group_id, f"distill_token_ids{where}", f"top-k of {len(top_ids)} exceeds {MAX_DISTILL_TOP_K}"
                )
            if top_ids and (min(top_ids) < 0 or max(top_ids) >= vocab_size):
                bad = min(top_ids) if min(top_ids) < 0 else max(top_ids)
                raise GroupRejected(
                    group_id, f"distill_token_ids{where}", f"token id {bad} outside the vocabulary [0, {vocab_size})"
                )
            if len(set(top_ids)) != len(top_ids):
                raise GroupRejected(group_id, f"distill_token_ids{where}", "a token id appears twice")
            for value in top_logprobs:
                if not (math.isfinite(value) and MIN_LOGPROB <= value <= 0.0):
                    raise GroupRejected(
                        group_id, f"distill_logprobs{where}", f"{value} is not a log-prob in [{MIN_LOGPROB:g}, 0]"
                    )
    return ids, logprobs


def _env_metrics(group_overrides: Optional[dict[str, Any]]) -> dict[str, float]:
    """Finite numbers under ``group_overrides["metrics"]``; anything else there is ignored, not fatal."""
    reported = (group_overrides or {}).get("metrics")
    if not isinstance(reported, dict):
        return {}
    metrics = {}
    for key, value in reported.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            number = float(value)
        except OverflowError:
            continue
        if math.isfinite(number):
            metrics[str(key)] = number
    return metrics


_ADVANTAGE_BOUNDS = (-MAX_ABS_ADVANTAGE, MAX_ABS_ADVANTAGE)


def _logprob_bounds(trained: bool) -> tuple[float, float]:
    return (MIN_LOGPROB, 0.0) if trained else (MIN_LOGPROB, 1.0)


def describe(raw: Any, index: int, step: int) -> str:
    """A stable id for log lines: env, trainer step and position in the batch."""
    env = raw.get("env_id") if isinstance(raw, dict) else None
    # Only an id is shown: whatever else an env put there could be huge.
    shown = env if isinstance(env, int) and not isinstance(env, bool) and abs(env) < 10**9 else "?"
    return f"env={shown}/step={step}/group={index}"


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
        except Exception as exc:  # noqa: BLE001 - no input may stop the run: a bug here is a named rejection too
            rejection = GroupRejected(group_id, "group", f"could not be read ({type(exc).__name__}: {exc})"[:300])
            logger.exception("rejected %s", rejection)
            rejected.append(rejection)
    return ValidatedBatch(groups, rejected)
