"""Environments' evaluation results, picked up from the files atroposlib writes, for the run's metrics.

The Atropos API has no route for evaluations: ``BaseEnv.evaluate_log`` prints a table,
sends the numbers to the env's own wandb run (when it has one) and writes
``<data_dir_to_save_evals>/metrics.json`` (lighteval's layout, numbers under
``results.all``), replacing it at every evaluation. The launcher points each
environment it starts at a folder of its own (``--env.data_dir_to_save_evals``, which
an env's own args may override), and :class:`EvalReports` reads a file again whenever
it changes, so each evaluation lands once in ``metrics.jsonl`` at the step the
trainer logs next. Evaluations before training (at an env's ``setup``) land at step 1.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

EVAL_FILE = "metrics.json"


def eval_metric_names(reported: dict, env_name: str | None) -> dict[str, float]:
    """Finite numbers of one report as ``eval/<name>`` (``eval/<env>/<name>`` when ``env_name`` is given)."""
    metrics = {}
    for key, value in reported.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        name = str(key).removeprefix("eval/")
        metrics[f"eval/{env_name}/{name}" if env_name else f"eval/{name}"] = float(value)
    return metrics


class EvalReports:
    """The evaluation folders of the environments a run started; :meth:`new_metrics` returns what changed."""

    def __init__(self) -> None:
        self._folders: list[tuple[Path, str]] = []
        self._seen: dict[Path, int] = {}

    def add(self, folder: Path, env_name: str) -> None:
        self._folders.append((folder, env_name))

    def new_metrics(self) -> dict[str, float]:
        """Numbers of every report written since the last call; replicas of one env share names (the last wins)."""
        by_env = len({name for _, name in self._folders}) > 1
        metrics: dict[str, float] = {}
        for folder, name in self._folders:
            path = folder / EVAL_FILE
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._seen.get(path) == stamp:
                continue
            try:
                reported = json.loads(path.read_text())["results"]["all"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Caught mid-write, or not atroposlib's layout: read again once it changes.
                logger.debug("evaluation report %s not readable yet: %s", path, exc)
                continue
            self._seen[path] = stamp
            if isinstance(reported, dict):
                metrics.update(eval_metric_names(reported, name if by_env else None))
        return metrics
