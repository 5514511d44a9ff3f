"""Per-step metrics: ``metrics.jsonl`` in the run directory plus verl's Tracking backends.

``metrics.jsonl`` is the project's own record (one flat JSON object per step,
appended, so a resumed run continues the same file); console, tensorboard,
wandb and the other backends go through ``verl.utils.tracking.Tracking``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from atropos_verl.groups import ScoredGroup


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        project_name: str,
        experiment_name: str,
        backends: list[str],
        config: Optional[dict[str, Any]] = None,
    ):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tracking = None
        if backends:
            from verl.utils.tracking import Tracking

            # verl's tensorboard adapter writes under TENSORBOARD_DIR; keep it inside the run.
            os.environ.setdefault("TENSORBOARD_DIR", str(run_dir / "tensorboard"))
            self._tracking = Tracking(
                project_name=project_name, experiment_name=experiment_name, default_backend=backends, config=config
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{key: _jsonable(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._tracking is not None:
            self._tracking.log(data=metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tracking is not None:
            self._tracking.finish()


def reward_metrics(groups: list[ScoredGroup]) -> dict[str, float]:
    """Score statistics of the trained groups, and the means of what environments reported about them."""
    scores = np.array([s for g in groups for s in g.scores], dtype=np.float64)
    metrics = {
        "reward/mean": float(scores.mean()),
        "reward/std": float(scores.std()),
        "reward/min": float(scores.min()),
        "reward/max": float(scores.max()),
    }
    reported: dict[str, list[float]] = {}
    for group in groups:
        for key, value in group.env_metrics.items():
            reported.setdefault(key, []).append(value)
    metrics.update({f"env/{key}": float(np.mean(values)) for key, values in reported.items()})
    return metrics


def env_group_counts(groups: list[ScoredGroup]) -> dict[str, float]:
    """Groups trained per environment (``data/groups_env_<env_id>``, the id the API gave it)."""
    counts: dict[str, float] = {}
    for group in groups:
        key = f"data/groups_env_{group.env_id if group.env_id is not None else 'unknown'}"
        counts[key] = counts.get(key, 0.0) + 1.0
    return counts


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
