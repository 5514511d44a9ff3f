"""One RL workload through this trainer and through verl's own GRPO (``main_ppo``), one after the other.

Same GPU, model, data (the parquet ``atropos_verl.data.prepare`` writes), prompts per step,
group size, lengths, learning rate and sampling temperature; no KL, no entropy bonus, one
optimizer step per batch, gradient clip 1.0, SDPA attention without sequence packing on both.
Prints per step and as medians (steps after the first): step time and its parts, generated
tokens/s, peak GPU memory (whole device, polled), reward, and the ratio of verl's median step
time to this trainer's (> 1: this trainer steps faster).

    python bench/rl_step.py --model builtin:smollm2-135m-instruct --data /data/gsm8k/train.jsonl --steps 30
    # throughput at a realistic size: random Qwen2.5-0.5B-shaped weights never emit EOS, so every
    # answer is --response-length tokens long
    python bench/rl_step.py --shape qwen2.5-0.5b --tokenizer QWEN_TOKENIZER_DIR --data ... --steps 8

The two sides differ by design in one way: Atropos environments keep sampling while the
trainer trains (the next batch forms during the update), verl's synchronous trainer
generates, then recomputes old log-probs, then updates. Each side runs with its own
defaults otherwise (this trainer: the gsm8k_1gpu experiment, or --experiment; verl: main_ppo's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Side:
    name: str
    exit_code: Optional[int] = None
    wall_s: float = 0.0
    peak_gpu_mib: int = 0
    steps: list[dict] = field(default_factory=list)
    log: Path = Path()


class GpuMemoryPoll:
    """Peak used memory of GPU 0 as nvidia-smi reports it (every process on the device counts)."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.peak = max(self.peak, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemoryPoll:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def run_side(side: Side, argv: list[str], env: dict[str, str], timeout: float) -> None:
    print(f"[{side.name}] {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with GpuMemoryPoll() as poll, open(side.log, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            side.exit_code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The whole session: verl's and this trainer's Ray workers and engines with it.
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
            side.exit_code = 124
    side.wall_s = time.perf_counter() - start
    side.peak_gpu_mib = poll.peak
    print(f"[{side.name}] exit {side.exit_code} after {side.wall_s:.0f}s, peak GPU {poll.peak} MiB", flush=True)
    if side.exit_code != 0:
        print("".join(side.log.read_text(errors="replace").splitlines(keepends=True)[-40:]), flush=True)


def ours_steps(metrics: Path, sequences: int) -> list[dict]:
    rows = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        record = json.loads(line)
        if "timing/step_s" not in record:
            continue
        # timing/step_s starts when the batch is in hand; the wait for it belongs to the step too,
        # as verl's timing_s/step includes its generation.
        wait_s = record.get("timing/wait_s", 0.0)
        rows.append(
            {
                "step": record["step"],
                "step_s": wait_s + record["timing/step_s"],
                "wait_s": wait_s,
                "update_s": record.get("timing/train_s", 0.0),
                "sync_s": record.get("timing/sync_s", 0.0),
                "generated_tokens": record.get("batch/trained_tokens", 0),
                "reward": record.get("reward/mean"),
                "correct": record.get("env/correct"),
                "sequences": record.get("batch/sequences", sequences),
            }
        )
    return rows


def verl_steps(metrics: Path, sequences: int) -> list[dict]:
    rows = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        record = json.loads(line)
        data = record.get("data", {})
        if "timing_s/step" not in data:
            continue
        response_mean = data.get("response_length/mean", 0.0)
        rows.append(
            {
                "step": record["step"],
                "step_s": data["timing_s/step"],
                "wait_s": data.get("timing_s/gen", 0.0),
                "update_s": data.get("timing_s/update_actor", 0.0) + data.get("timing_s/old_log_prob", 0.0),
                "sync_s": data.get("timing_s/update_weights", 0.0),
                "generated_tokens": response_mean * sequences,
                "reward": data.get("critic/score/mean"),
                "correct": data.get("critic/score/mean"),
                "sequences": sequences,
            }
        )
    return rows


def median(rows: list[dict], key: str) -> float:
    values = [row[key] for row in rows[1:] or rows if row[key] is not None]
    return statistics.median(values) if values else float("nan")


def summary(side: Side) -> dict:
    rows = side.steps
    step_s = median(rows, "step_s")
    tokens = median(rows, "generated_tokens")
    return {
        "side": side.name,
        "exit": side.exit_code,
        "steps": len(rows),
        "wall_s": round(side.wall_s, 1),
        "step_s": step_s,
        "wait_or_gen_s": median(rows, "wait_s"),
        "update_s": median(rows, "update_s"),
        "sync_s": median(rows, "sync_s"),
        "generated_tokens_per_s": tokens / step_s if step_s == step_s and step_s > 0 else float("nan"),
        "peak_gpu_mib": side.peak_gpu_mib,
        "reward_first": rows[0]["reward"] if rows else None,
        "reward_last": rows[-1]["reward"] if rows else None,
    }


def print_steps(sides: list[Side]) -> None:
    names = [side.name for side in sides]
    header = "step | " + " | ".join(f"{n}: step_s wait/gen update sync reward" for n in names)
    print(header)
    longest = max((len(side.steps) for side in sides), default=0)
    for index in range(longest):
        cells = []
        for side in sides:
            if index < len(side.steps):
                r = side.steps[index]
                reward = f"{r['reward']:.3f}" if r["reward"] is not None else "-"
                cells.append(f"{r['step_s']:.2f} {r['wait_s']:.2f} {r['update_s']:.2f} {r['sync_s']:.2f} {reward}")
            else:
                cells.append("-")
        print(f"{index + 1} | " + " | ".join(cells))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model path, hub id or builtin:<name>")
    parser.add_argument("--shape", help="random weights of this Qwen2 shape instead (see bench/actor_update.py)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --shape")
    parser.add_argument("--data", default="openai/gsm8k", help="GSM8K rows: hub id or a local .jsonl/.parquet")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--response-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in either side's vLLM")
    parser.add_argument("--only", choices=("both", "ours", "verl"), default="both")
    parser.add_argument(
        "--experiment", default="gsm8k_1gpu", help="this trainer's experiment (gsm8k_sglang_1gpu: served by SGLang)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per side")
    parser.add_argument("--out", type=Path, default=Path("rl_step_out"))
    parser.add_argument("--ours-arg", action="append", default=[], help="extra override for this trainer")
    parser.add_argument("--verl-arg", action="append", default=[], help="extra override for main_ppo")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.shape):
        parser.error("give exactly one of --model and --shape")

    from atropos_verl.assets import resolve_model_path
    from atropos_verl.data.prepare import prepare

    args.out.mkdir(parents=True, exist_ok=True)
    if args.shape:
        sys.path.insert(0, str(Path(__file__).parent))
        from actor_update import make_model_dir

        model = str(make_model_dir(args.shape, args.tokenizer, args.out / "model")[0])
    else:
        model = resolve_model_path(args.model)
    train, rows, skipped = prepare("gsm8k", args.out / "data", source=args.data, split="train")
    print(f"data: {rows} rows in {train} ({skipped}); model: {model}", flush=True)

    sequences = args.prompts * args.group_size
    env = dict(os.environ)
    sides = []
    if args.only in ("both", "ours"):
        side = Side("ours", log=args.out / "ours.log")
        run_dir = args.out / "ours"
        overrides = [
            f"+experiment={args.experiment}",
            f"model.path={model}",
            f"data.path={train}",
            f"data.group_size={args.group_size}",
            f"data.temperature={args.temperature}",
            f"data.max_prompt_length={args.prompt_length}",
            f"data.max_response_length={args.response_length}",
            f"trainer.batch_size={sequences}",
            f"trainer.total_training_steps={args.steps}",
            f"trainer.max_token_len={args.prompt_length + args.response_length + 16}",
            f"engine.max_model_len={args.prompt_length + args.response_length + 64}",
            f"engine.gpu_memory_utilization={args.gpu_memory_utilization}",
            f"actor.lr={args.lr}",
            "trainer.save_freq=0",
            "trainer.progress_bar=false",
            "trainer.logger=[]",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={args.out / 'hydra'}",
        ]
        if args.enforce_eager:
            overrides.append("engine.extra_args=[--enforce-eager]")
        run_side(side, [sys.executable, "-m", "atropos_verl.train", *overrides, *args.ours_arg], env, args.timeout)
        side.steps = ours_steps(run_dir / "metrics.jsonl", sequences)
        sides.append(side)
    if args.only in ("both", "verl"):
        side = Side("verl", log=args.out / "verl.log")
        metrics = args.out / "verl" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        overrides = [
            "algorithm.adv_estimator=grpo",
            "algorithm.use_kl_in_reward=false",
            f"data.train_files={train}",
            f"data.val_files={train}",
            f"data.train_batch_size={args.prompts}",
            f"data.max_prompt_length={args.prompt_length}",
            f"data.max_response_length={args.response_length}",
            "data.filter_overlong_prompts=true",
            "data.truncation=error",
            f"actor_rollout_ref.model.path={model}",
            "actor_rollout_ref.model.use_remove_padding=false",
            "actor_rollout_ref.model.enable_gradient_checkpointing=false",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            "actor_rollout_ref.actor.strategy=fsdp2",
            f"actor_rollout_ref.actor.optim.lr={args.lr}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
            "actor_rollout_ref.actor.use_dynamic_bsz=true",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=32768",
            "actor_rollout_ref.actor.use_kl_loss=false",
            "actor_rollout_ref.actor.entropy_coeff=0",
            "actor_rollout_ref.actor.grad_clip=1.0",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
            f"actor_rollout_ref.rollout.n={args.group_size}",
            f"actor_rollout_ref.rollout.temperature={args.temperature}",
            f"actor_rollout_ref.rollout.gpu_memory_utilization={args.gpu_memory_utilization}",
            f"actor_rollout_ref.rollout.enforce_eager={str(args.enforce_eager).lower()}",
            "trainer.n_gpus_per_node=1",
            "trainer.nnodes=1",
            f"trainer.total_training_steps={args.steps}",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
            "trainer.logger=[console,file]",
            "trainer.project_name=rl_step",
            "trainer.experiment_name=verl_grpo",
            f"trainer.default_local_dir={args.out / 'verl' / 'checkpoints'}",
            f"hydra.run.dir={args.out / 'verl' / 'hydra'}",
        ]
        run_side(
            side,
            [sys.executable, "-m", "verl.trainer.main_ppo", *overrides, *args.verl_arg],
            {**env, "VERL_FILE_LOGGER_PATH": str(metrics)},
            args.timeout,
        )
        side.steps = verl_steps(metrics, sequences)
        sides.append(side)

    earlier = args.out / "summary.json"
    if args.only != "both" and earlier.exists():
        # The other side from an earlier call with the same --out (e.g. one side per call).
        saved = json.loads(earlier.read_text())
        for row in saved["summaries"]:
            if row["side"] != args.only:
                other = Side(row["side"], exit_code=row["exit"], wall_s=row["wall_s"], peak_gpu_mib=row["peak_gpu_mib"])
                other.steps = saved["steps"][row["side"]]
                sides.insert(0 if row["side"] == "ours" else len(sides), other)
    print_steps(sides)
    summaries = [summary(side) for side in sides]
    for row in summaries:
        print(json.dumps(row))
    by_name = {row["side"]: row for row in summaries}
    if "ours" in by_name and "verl" in by_name and by_name["ours"]["steps"] and by_name["verl"]["steps"]:
        ratio = by_name["verl"]["step_s"] / by_name["ours"]["step_s"]
        tokens = by_name["ours"]["generated_tokens_per_s"] / by_name["verl"]["generated_tokens_per_s"]
        print(f"ratio (verl step time / ours): {ratio:.2f}x; generated tokens/s ours/verl: {tokens:.2f}x")
    (args.out / "summary.json").write_text(
        json.dumps({"summaries": summaries, "steps": {s.name: s.steps for s in sides}}, indent=1)
    )
    return 0 if all(side.exit_code == 0 for side in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
