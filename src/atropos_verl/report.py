"""What the user watches: a progress bar per step, a one-screen summary, reward/loss curves.

All of it is derived from the per-step metrics the trainer already logs, so a
finished run's ``metrics.jsonl`` can be summarised or plotted again later with
``python -m atropos_verl.report RUN_DIR``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from atropos_verl.metrics import read_metrics

logger = logging.getLogger(__name__)

# Start and end reward are averaged over this many steps: single steps are noisy.
WINDOW = 3


class ProgressBar:
    """tqdm bar over training steps showing reward, loss, throughput, sync time and queue depth."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="training", unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, Any], queue_size: Optional[int]) -> None:
        if self._bar is None:
            return
        postfix = {
            "reward": f"{metrics['reward/mean']:.3f}",
            "loss": f"{metrics['train/loss']:.4f}",
            "tok/s": f"{metrics['perf/tokens_per_s']:.0f}",
        }
        if "timing/sync_s" in metrics:
            postfix["sync"] = f"{metrics['timing/sync_s']:.2f}s"
        if queue_size is not None:
            postfix["queue"] = queue_size
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _window_mean(records: list[dict[str, Any]], key: str, head: bool) -> Optional[float]:
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    chosen = values[:WINDOW] if head else values[-WINDOW:]
    return sum(chosen) / len(chosen)


def summary(records: list[dict[str, Any]], wall_s: Optional[float] = None) -> dict[str, Any]:
    """Start/end reward (means of the first/last steps), steps, data and timing totals."""
    result: dict[str, Any] = {"steps": len(records)}
    if not records:
        return result
    start, end = _window_mean(records, "reward/mean", True), _window_mean(records, "reward/mean", False)
    result.update(
        start_reward=start,
        end_reward=end,
        reward_gain=None if start is None or end is None else end - start,
        best_reward=max(r["reward/mean"] for r in records),
        start_loss=_window_mean(records, "train/loss", True),
        end_loss=_window_mean(records, "train/loss", False),
        groups_rejected=records[-1].get("data/groups_rejected_total", 0),
        mean_step_s=sum(r["timing/step_s"] for r in records) / len(records),
        mean_sync_s=_window_mean(records, "timing/sync_s", False),
    )
    # Evaluations land at the steps they were reported: first and last report of each metric.
    evals = sorted({key for r in records for key in r if key.startswith("eval/")})
    result["evals"] = {
        key: ([r[key] for r in records if key in r][0], [r[key] for r in records if key in r][-1]) for key in evals
    }
    if wall_s is not None:
        result["wall_s"] = wall_s
    return result


def format_summary(stats: dict[str, Any], run_dir: Path) -> str:
    def f(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "",
        "=" * 60,
        f"run finished: {run_dir}",
        f"steps            {stats['steps']}",
    ]
    if stats["steps"]:
        lines += [
            f"reward           {f(stats['start_reward'])} -> {f(stats['end_reward'])} "
            f"(gain {f(stats['reward_gain'], '+.3f')}, best step {f(stats['best_reward'])}; "
            f"means of the first/last {WINDOW} steps)",
            f"loss             {f(stats['start_loss'], '.4f')} -> {f(stats['end_loss'], '.4f')}",
            f"step time        {f(stats['mean_step_s'], '.2f')} s mean"
            + (f", sync {f(stats['mean_sync_s'], '.2f')} s" if stats.get("mean_sync_s") is not None else ""),
            f"groups rejected  {stats['groups_rejected']}",
        ]
        lines += [f"{key:<16} {f(first)} -> {f(last)}" for key, (first, last) in stats.get("evals", {}).items()]
    if "wall_s" in stats:
        lines.append(f"wall time        {stats['wall_s'] / 60:.1f} min")
    lines += [
        f"metrics          {run_dir / 'metrics.jsonl'}",
        f"curves           {run_dir / 'curves.png'}",
        f"checkpoints      {run_dir / 'checkpoints'}",
        "=" * 60,
    ]
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Reward (mean with min/max band) and loss per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_reward, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_reward.plot(steps, [r["reward/mean"] for r in records], color="tab:green", label="mean")
    if all("reward/min" in r and "reward/max" in r for r in records):
        ax_reward.fill_between(
            steps,
            [r["reward/min"] for r in records],
            [r["reward/max"] for r in records],
            color="tab:green",
            alpha=0.15,
            label="min-max",
        )
    for key in sorted({k for r in records for k in r if k.startswith("eval/")}):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax_reward.plot(*zip(*points), linestyle="--", marker="o", label=key)
    ax_reward.set(title="reward", xlabel="step")
    ax_reward.legend(loc="lower right")
    ax_loss.plot(steps, [r["train/loss"] for r in records], color="tab:blue")
    ax_loss.set(title="loss (advantage-weighted token loss)", xlabel="step")
    for ax in (ax_reward, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(run_dir: Path, started_at: Optional[float] = None) -> dict[str, Any]:
    """Write curves.png and print the summary of the run in ``run_dir``; returns the summary."""
    metrics_path = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_path) if metrics_path.exists() else []
    stats = summary(records, None if started_at is None else time.monotonic() - started_at)
    if records:
        plot_curves(records, run_dir / "curves.png")
    print(format_summary(stats, run_dir), flush=True)
    return stats


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a run and (re)draw its curves.png")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    finish(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
