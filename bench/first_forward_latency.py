"""Host time from ``Actor.train``'s call on the driver to the worker's first micro-batch forward.

At the start of an update the GPU is idle: everything the host does before the
first forward (dispatch, Ray hand-over, mini- and micro-batch split, set-up)
adds to the step time one for one. Same model shapes and batch as
actor_update.py; prints the median over the steps after two warm-ups.

    python bench/first_forward_latency.py --shape qwen2.5-0.5b --tokenizer <dir>      # H100
    python bench/first_forward_latency.py --shape tiny --device cpu --prompt-len 16 --response-len 48  # CPU
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from actor_update import make_groups, make_model_dir

from atropos_verl.actor import Actor, PolicyWorker
from atropos_verl.advantages import token_advantages
from atropos_verl.batch import build_batch
from atropos_verl.config import AdvantageConfig, RunConfig
from verl.single_controller.base.decorator import Dispatch, register


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
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=768)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        from atropos_verl.assets import tiny_llama

        args.tokenizer = tiny_llama()

    workdir = Path(tempfile.mkdtemp(prefix="first-forward-"))
    try:
        model_dir, _, vocab = make_model_dir(args.shape, args.tokenizer, workdir / "model")
        groups = make_groups(args.batch, 8, args.prompt_len, args.response_len, vocab)
        advantages, _ = token_advantages(groups, AdvantageConfig())
        cfg = RunConfig()
        cfg.trainer.device = args.device
        cfg.trainer.total_training_steps = args.steps
        cfg.actor.dtype = "bfloat16" if args.device == "cuda" else "float32"
        cfg.actor.use_dynamic_bsz = False
        cfg.actor.micro_batch_size_per_gpu = args.micro_batch
        cfg.actor.max_token_len_per_gpu = args.micro_batch * (args.prompt_len + args.response_len)
        cfg.validate()
        actor = Actor(cfg, str(model_dir), worker_cls=TimedPolicyWorker)
        latencies, steps = [], []
        try:
            for _ in range(args.steps):
                batch, _ = build_batch(groups, advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=actor.batch_multiple)
                called = time.time()
                actor.train(batch)
                steps.append(time.time() - called)
                latencies.append(actor.workers.first_forward_after(called)[0] - called)
        finally:
            actor.shutdown()
        print(f"shape {args.shape}, {args.device}, batch {args.batch} x {args.prompt_len}+{args.response_len}, micro-batch {args.micro_batch}")
        print(f"driver call -> first forward: median {1e3 * statistics.median(latencies[2:]):.1f} ms   "
              f"(each step: {' '.join(f'{1e3 * x:.1f}' for x in latencies)})")
        print(f"step: median {1e3 * statistics.median(steps[2:]):.0f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
