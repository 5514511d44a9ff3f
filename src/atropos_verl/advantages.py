"""Per-token advantages for a batch of scored groups.

Precedence, per sequence:
1. ``overrides.set_advantage_to_zero`` → exactly 0 at every token;
2. ``overrides.sft`` → 1 at every token (plain supervised cross-entropy);
3. the environment's token-level ``advantages`` when it sent them
   (and ``advantage.use_env_advantages``);
4. otherwise the sequence's score, centred (and scaled) within its group
   (``normalization=group``, GRPO), across the batch (``batch``) or left raw
   (``none``).
Clipping to ``advantage.clip`` applies last to 3 and 4. Group and batch
statistics are taken over every sequence whose score is a policy sample
(including the ones forced to zero: they were sampled from the same prompt),
never over SFT sequences or groups that brought their own advantages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atropos_verl.config import AdvantageConfig
from atropos_verl.groups import IGNORED, ScoredGroup


@dataclass(frozen=True)
class AdvantageStats:
    mean: float
    std: float
    min: float
    max: float
    clipped_fraction: float
    env_provided_fraction: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "advantage/mean": self.mean,
            "advantage/std": self.std,
            "advantage/min": self.min,
            "advantage/max": self.max,
            "advantage/clipped_fraction": self.clipped_fraction,
            "advantage/env_provided_fraction": self.env_provided_fraction,
        }


def _centre(scores: np.ndarray, cfg: AdvantageConfig) -> np.ndarray:
    centred = scores - scores.mean()
    if cfg.scale_by_std and len(scores) > 1:
        centred = centred / (scores.std(ddof=0) + cfg.eps)
    return centred


def _uses_scores(group: ScoredGroup, i: int, cfg: AdvantageConfig) -> bool:
    env_given = cfg.use_env_advantages and group.advantages is not None
    return not (group.sft[i] or env_given)


def score_advantages(groups: list[ScoredGroup], cfg: AdvantageConfig) -> list[np.ndarray]:
    """One advantage per sequence from scores (NaN where the score is not used)."""
    per_group = [np.full(g.size, np.nan) for g in groups]
    selected = [[i for i in range(g.size) if _uses_scores(g, i, cfg)] for g in groups]
    if cfg.normalization == "batch":
        flat = np.array([groups[g].scores[i] for g, idx in enumerate(selected) for i in idx], dtype=np.float64)
        if flat.size:
            centred = iter(_centre(flat, cfg))
            for g, idx in enumerate(selected):
                for i in idx:
                    per_group[g][i] = next(centred)
        return per_group
    for g, idx in enumerate(selected):
        if not idx:
            continue
        scores = np.array([groups[g].scores[i] for i in idx], dtype=np.float64)
        values = _centre(scores, cfg) if cfg.normalization == "group" else scores
        per_group[g][idx] = values
    return per_group


def token_advantages(groups: list[ScoredGroup], cfg: AdvantageConfig) -> tuple[list[list[np.ndarray]], AdvantageStats]:
    """Advantages aligned with ``tokens`` (``[group][sequence] -> (len,)``) and their statistics."""
    from_scores = score_advantages(groups, cfg)
    result: list[list[np.ndarray]] = []
    trained_values: list[np.ndarray] = []
    clipped = 0
    env_provided = 0
    for g, group in enumerate(groups):
        rows = []
        for i, toks in enumerate(group.tokens):
            length = len(toks)
            # Position 0 is never trained, so it takes no part in the statistics.
            trained = np.asarray(group.masks[i]) != IGNORED
            trained[0] = False
            if group.zero_advantage[i]:
                row = np.zeros(length)
            elif group.sft[i]:
                row = np.ones(length)
            else:
                if cfg.use_env_advantages and group.advantages is not None:
                    row = np.asarray(group.advantages[i], dtype=np.float64)
                    env_provided += 1
                else:
                    row = np.full(length, from_scores[g][i])
                if cfg.clip is not None:
                    clipped += int(((row < cfg.clip[0]) | (row > cfg.clip[1]))[trained].sum())
                    row = np.clip(row, cfg.clip[0], cfg.clip[1])
            rows.append(row)
            trained_values.append(row[trained])
        result.append(rows)
    values = np.concatenate(trained_values) if trained_values else np.zeros(0)
    num_sequences = sum(g.size for g in groups)
    stats = AdvantageStats(
        mean=float(values.mean()) if values.size else 0.0,
        std=float(values.std()) if values.size else 0.0,
        min=float(values.min()) if values.size else 0.0,
        max=float(values.max()) if values.size else 0.0,
        clipped_fraction=clipped / max(values.size, 1),
        env_provided_fraction=env_provided / max(num_sequences, 1),
    )
    return result, stats
