"""Tabulate a Hydra multirun of atropos_verl.train: one row per run, the swept overrides as its label.

python experiments/tabulate.py multirun/<time>            # prints the table, writes sweep.png there
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from atropos_verl.metrics import read_metrics
from atropos_verl.report import summary


def runs_of(sweep_dir: Path) -> list[tuple[Path, list[str]]]:
    runs = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").exists()), key=lambda p: p.name):
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        runs.append((run_dir, overrides))
    return runs


def swept_labels(runs: list[tuple[Path, list[str]]]) -> list[str]:
    """Only the overrides that differ between runs name them."""
    common = set.intersection(*(set(o) for _, o in runs)) if runs else set()
    return [" ".join(o for o in overrides if o not in common) or run_dir.name for run_dir, overrides in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    runs = runs_of(args.sweep_dir)
    if not runs:
        print(f"no runs with metrics.jsonl under {args.sweep_dir}", file=sys.stderr)
        return 1
    labels = swept_labels(runs)
    width = max(len(label) for label in labels)
    print(f"{'run':<{width}}  steps  start reward  end reward    gain  end loss")
    curves = []
    for (run_dir, _), label in zip(runs, labels):
        records = read_metrics(run_dir / "metrics.jsonl")
        s = summary(records)
        print(
            f"{label:<{width}}  {s['steps']:5d}  {s.get('start_reward', float('nan')):12.3f}  "
            f"{s.get('end_reward', float('nan')):10.3f}  {s.get('reward_gain') or 0.0:+6.3f}  "
            f"{s.get('end_loss', float('nan')):8.4f}"
        )
        curves.append((label, [r["step"] for r in records], [r["reward/mean"] for r in records]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps, rewards in curves:
        ax.plot(steps, rewards, label=label)
    ax.set(title="reward by run", xlabel="step", ylabel="reward/mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.sweep_dir / "sweep.png", dpi=110)
    print(f"curves: {args.sweep_dir / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
