"""Host time from ``Actor.train``'s call on the driver to the worker's first micro-batch forward.

At the start of an update the GPU is idle: everything the host does before the
first forward (dispatch, Ray hand-over, mini- and micro-batch split, set-up)
adds to the step time one for one. Same workload options as actor_update.py;
prints the median over the steps after two warm-ups.

    python bench/first_forward_latency.py --shape qwen2.5-0.5b --tokenizer <dir>      # H100
    python bench/first_forward_latency.py --shape tiny --device cpu --dtype float32 \
        --prompt-len 16 --response-len 112  # CPU
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from actor_update import add_workload_arguments, run_config, workload
from verl.single_controller.base.decorator import Dispatch, register

from atropos_verl.batch import build_batch
from atropos_verl.placement import node_placement
from atropos_verl.policy.actor import Actor, resolve_device
from atropos_verl.policy.worker import PolicyWorker


class TimedPolicyWorker(PolicyWorker):
    """PolicyWorker that notes the wall-clock time at which each micro-batch's forward starts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_starts: list[float] = []
        forward_step = self.engine.forward_step

        def timed_forward_step(*step_args, **step_kwargs):
            self.forward_starts.append(time.time())
            return forward_step(*step_args, **step_kwargs)

        self.engine.forward_step = timed_forward_step

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def first_forward_after(self, moment: float) -> float:
        return min(t for t in self.forward_starts if t >= moment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.set_defaults(steps=12)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="first-forward-"))
    try:
        model_dir, _, groups, advantages = workload(args, workdir)
        cfg = run_config(args)
        placement = node_placement(cfg.trainer, cfg.engine, resolve_device(cfg.trainer.device))
        actor = Actor(cfg, str(model_dir), placement, worker_cls=TimedPolicyWorker)
        latencies, steps = [], []
        try:
            for _ in range(args.steps):
                batch, _ = build_batch(
                    groups,
                    advantages,
                    reduction="token-mean",
                    use_sampling_temperature=True,
                    pad_to_multiple=actor.batch_multiple,
                )
                called = time.time()
                actor.train(batch)
                steps.append(time.time() - called)
                latencies.append(actor.workers.first_forward_after(called)[0] - called)
        finally:
            actor.shutdown()
        print(
            f"shape {args.shape}, {args.device}, batch {args.batch} x {args.prompt_len}+{args.response_len}, "
            f"micro-batch {args.micro_batch}"
        )
        print(
            f"driver call -> first forward: median {1e3 * statistics.median(latencies[2:]):.1f} ms   "
            f"(each step: {' '.join(f'{1e3 * x:.1f}' for x in latencies)})"
        )
        print(f"step: median {1e3 * statistics.median(steps[2:]):.0f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
