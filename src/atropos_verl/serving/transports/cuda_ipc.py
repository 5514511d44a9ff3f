"""The CUDA IPC transport: a replica on the trainer's GPU reads the new weights straight from trainer memory.

Both ends of the format live here and in the vLLM adapter:

* trainer end, :class:`IpcStage` (runs in the policy's rank-0 worker, the process that
  owns the memory, because a CUDA IPC handle must come from the allocating process):
  every full tensor, in HF names and the engine's dtype, is copied on the GPU into
  buckets (uint8 buffers of about ``bucket_bytes``, tensors back to back); a tied
  ``lm_head`` is left out (engines re-tie it). The buckets are allocated once and
  reused by every later version, so each sync is device-to-device copies only; they
  hold one copy of the weights in the engine's dtype on the trainer's GPU until the
  transport is closed. Each bucket becomes one *update*: vLLM 0.24's packed IPC
  ``update_info`` (names, dtypes, shapes, byte sizes, and the pickled
  ``torch.multiprocessing`` handle of the bucket keyed by the GPU's UUID);
* replica end, ``VLLMReplica.load_weights_ipc``: one ``/collective_rpc`` to the worker
  extension (``ReloadWorkerExtension.atropos_verl_load_ipc``), which opens the buckets
  from their handles and loads the tensors in place with the model's own loader (HF
  names: vLLM fuses qkv / gate_up itself); then the prefix-cache reset. The bucket
  format is vLLM 0.24's packed ``update_info``, so the same updates also suit its
  ``/update_weights`` route.

``prepare`` (gather + pack) runs while replicas serve; ``push`` only makes the HTTP calls.
The buckets keep the last pushed version until the next ``prepare``, so ``restore`` gives a
restarted replica the same updates again (syncs and restarts never overlap).
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.base import TransferStats, WeightReceiver, WeightTransport

TIED_OUTPUT = "lm_head.weight"


def skips(name: str, tied_embeddings: bool) -> bool:
    """A tied output projection is the input embedding: the engine re-ties it, sending it would load it twice."""
    return tied_embeddings and name == TIED_OUTPUT


@dataclass
class Bucket:
    capacity: int
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    dtype_names: list[str] = field(default_factory=list)

    @property
    def used(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0


class BucketPacker:
    """Places tensors back to back into buckets of ``bucket_bytes`` (a larger tensor gets a bucket of its own).

    vLLM's packed consumer splits a bucket by the byte sizes alone, so there is no padding:
    a tensor whose element size does not divide its offset starts a new bucket instead.
    ``capacities`` (from an earlier version) are reused when the same layout comes again.
    """

    def __init__(self, bucket_bytes: int, capacities: Sequence[int] = ()):
        if bucket_bytes < 1:
            raise ValueError("bucket_bytes must be positive")
        self.bucket_bytes = bucket_bytes
        self.capacities = list(capacities)
        self.buckets: list[Bucket] = []

    def place(
        self, name: str, shape: Sequence[int], dtype_name: str, nbytes: int, element_size: int
    ) -> tuple[int, int]:
        """(bucket index, byte offset) for one tensor; opens a new bucket when it does not fit."""
        current = self.buckets[-1] if self.buckets else None
        if current is None or current.used + nbytes > current.capacity or current.used % element_size:
            index = len(self.buckets)
            wanted = max(self.bucket_bytes, nbytes)
            reusable = index < len(self.capacities) and self.capacities[index] >= nbytes
            current = Bucket(capacity=self.capacities[index] if reusable else wanted)
            self.buckets.append(current)
        offset = current.used
        current.names.append(name)
        current.offsets.append(offset)
        current.sizes.append(nbytes)
        current.shapes.append([int(d) for d in shape])
        current.dtype_names.append(dtype_name)
        return len(self.buckets) - 1, offset


def pack_into_buckets(
    named_tensors: Iterable[tuple[str, Any]],
    buffers: list[Any],
    allocate: Callable[[int], Any],
    *,
    bucket_bytes: int,
    dtype: str,
    writer: bool,
    tied_embeddings: bool,
) -> tuple[BucketPacker, list[tuple[str, Any]]]:
    """Copy every full tensor, cast to the engine's dtype, into ``buffers``; the layout and each tensor's view.

    ``buffers`` (uint8, one per bucket) are reused in place from the last version: a bucket is
    allocated with ``allocate(capacity)`` only when the layout needs a new or larger one, and
    the ones no longer needed are dropped. Every rank must walk ``named_tensors`` (each full
    tensor is an all-gather); only the ``writer`` copies. Copies on a GPU are asynchronous:
    synchronize before handing the buffers out.
    """
    import torch

    target = torch.float32 if dtype == "float32" else torch.bfloat16
    packer = BucketPacker(bucket_bytes, [b.numel() for b in buffers])
    views = []
    for name, tensor in named_tensors:
        if not writer or skips(name, tied_embeddings):
            continue
        out_dtype = target if tensor.is_floating_point() else tensor.dtype
        element = torch.empty((), dtype=out_dtype).element_size()
        nbytes = tensor.numel() * element
        index, offset = packer.place(name, tensor.shape, str(out_dtype).split(".")[-1], nbytes, element)
        capacity = packer.buckets[index].capacity
        if index == len(buffers):
            buffers.append(allocate(capacity))
        elif buffers[index].numel() != capacity:
            buffers[index] = allocate(capacity)
        view = buffers[index][offset : offset + nbytes].view(out_dtype).view(tensor.shape)
        # One kernel: the cast into the engine's dtype writes straight into the bucket.
        view.copy_(tensor.detach(), non_blocking=view.is_cuda)
        views.append((name, view))
    if writer:
        del buffers[len(packer.buckets) :]
    return packer, views


def update_info(bucket: Bucket, gpu_uuid: str, handle_args: tuple) -> dict[str, Any]:
    """vLLM 0.24's packed ``IPCWeightTransferUpdateInfo`` for one bucket, in its HTTP form."""
    return {
        "names": list(bucket.names),
        "dtype_names": list(bucket.dtype_names),
        "shapes": [list(s) for s in bucket.shapes],
        "tensor_sizes": list(bucket.sizes),
        "packed": True,
        "ipc_handles_pickled": base64.b64encode(pickle.dumps({gpu_uuid: handle_args})).decode("ascii"),
    }


def gpu_uuid(device: Any = None) -> str:
    """The physical GPU's UUID as vLLM's worker spells it (handles are looked up by it)."""
    import torch

    return str(torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device).uuid)


class IpcStage:
    """Trainer end: the reusable GPU buckets of one worker and the updates describing their contents."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []

    def stage(
        self,
        named_tensors: Iterable[tuple[str, Any]],
        *,
        bucket_bytes: int,
        dtype: str,
        writer: bool,
        tied_embeddings: bool,
    ) -> dict[str, Any]:
        """Copy every full tensor into the buckets (only when ``writer``); every rank must walk ``named_tensors``."""
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        start = time.perf_counter()
        packer, views = pack_into_buckets(
            named_tensors,
            self.buffers,
            lambda capacity: torch.empty(capacity, dtype=torch.uint8, device="cuda"),
            bucket_bytes=bucket_bytes,
            dtype=dtype,
            writer=writer,
            tied_embeddings=tied_embeddings,
        )
        if not writer:
            return {"updates": [], "bytes": 0.0, "tensors": 0.0, "seconds": time.perf_counter() - start}
        torch.cuda.current_stream().synchronize()
        uuid = gpu_uuid()
        updates = [
            update_info(bucket, uuid, reduce_tensor(buffer)[1]) for bucket, buffer in zip(packer.buckets, self.buffers)
        ]
        return {
            "updates": updates,
            "bytes": float(sum(b.used for b in packer.buckets)),
            "tensors": float(len(views)),
            "buckets": float(len(updates)),
            "seconds": time.perf_counter() - start,
        }

    def release(self) -> None:
        import torch

        self.buffers.clear()
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()


class IpcPolicyWeights(Protocol):
    """What the transport asks of the policy (the Actor; rank 0's worker does the work)."""

    def stage_weights_ipc(self, bucket_bytes: int, dtype: str) -> dict[str, Any]: ...

    def release_weights_ipc(self) -> None: ...


class IpcReceiver(WeightReceiver, Protocol):
    async def load_weights_ipc(self, updates: list[dict[str, Any]], version: int) -> None: ...


def select_transport(
    setting: str,
    *,
    device: str,
    engine_kind: str,
    trainer_gpu: Optional[str],
    replica_gpus: Mapping[str, Sequence[str]],
) -> str:
    """``folder``, ``shared_memory``, ``cuda_ipc`` or ``nccl`` for ``engine.weight_transport=setting``.

    shared_memory and cuda_ipc name the medium; the format is the engine's: for vLLM its
    worker extension (the /dev/shm file, packed IPC updates), for SGLang its
    ``/update_weights_from_tensor`` payloads (:mod:`~atropos_verl.serving.transports.sglang_tensor`).
    shared_memory needs a CPU trainer (replicas on its host). cuda_ipc needs CUDA and every
    worker of every replica on the trainer rank 0's GPU (``replica_gpus``: replica name → its
    workers' GPUs, named as ``trainer_gpu`` is). ``auto`` picks the one that fits and falls
    back to folder otherwise; an explicit choice that cannot work is an error naming why.
    nccl (replicas on other GPUs: a broadcast from the trainer's rank 0) is chosen only
    explicitly, as it has not run on GPUs yet; for vLLM it needs CUDA, for SGLang the same
    route runs with gloo on a CPU trainer (:mod:`~atropos_verl.serving.transports.sglang_nccl`).
    """
    if engine_kind not in ("vllm", "sglang"):
        if setting in ("auto", "folder"):
            return "folder"
        raise EngineError(
            f"engine.weight_transport={setting} needs engine.kind=vllm or sglang, got {engine_kind}; use folder"
        )
    if setting == "folder":
        return "folder"
    if setting == "nccl":
        if device != "cuda" and engine_kind != "sglang":
            raise EngineError(
                f"engine.weight_transport=nccl needs a CUDA trainer (or SGLang replicas, which take it over gloo on "
                f"CPU), got trainer.device={device}, engine.kind={engine_kind}"
            )
        return "nccl"
    if device == "cpu" and setting in ("auto", "shared_memory"):
        return "shared_memory"
    if setting == "shared_memory":
        raise EngineError(
            f"engine.weight_transport=shared_memory needs the trainer on the CPU, but it runs on {device}; "
            "use auto, cuda_ipc or folder"
        )
    reason = None
    if device != "cuda":
        reason = f"the trainer runs on {device}, not CUDA"
    else:
        for name, gpus in replica_gpus.items():
            if not gpus or any(gpu != trainer_gpu for gpu in gpus):
                reason = f"replica {name} runs on GPU(s) {list(gpus)}, not on the trainer's GPU {trainer_gpu}"
                break
    if reason is None:
        return "cuda_ipc"
    if setting == "cuda_ipc":
        raise EngineError(f"engine.weight_transport=cuda_ipc needs colocated CUDA replicas, but {reason}")
    return "folder"


class CudaIpcTransport(WeightTransport):
    name = "cuda_ipc"

    def __init__(self, policy: IpcPolicyWeights, *, dtype: str, bucket_bytes: int = 512 << 20, timeout_s: float = 300):
        self.policy = policy
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.current: Optional[tuple[int, list[dict[str, Any]]]] = None
        self._staged: Optional[tuple[int, list[dict[str, Any]]]] = None
        self.last_stage: dict[str, Any] = {}

    async def prepare(self, version: int) -> TransferStats:
        start = time.perf_counter()
        staged = await asyncio.to_thread(self.policy.stage_weights_ipc, self.bucket_bytes, self.dtype)
        # The buckets now hold this version, not the current one any more.
        self.current = None
        self._staged = (version, staged["updates"])
        self.last_stage = {k: v for k, v in staged.items() if k != "updates"}
        return TransferStats(bytes=staged["bytes"], prepare_seconds=time.perf_counter() - start)

    async def _load(self, replica: IpcReceiver, updates: list[dict[str, Any]], version: int) -> None:
        try:
            await asyncio.wait_for(replica.load_weights_ipc(updates, version), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineError(
                f"{replica.name}: CUDA IPC weight sync of policy version {version} did not finish within "
                f"{self.timeout_s:g}s; the replica may hold a mix of old and new weights: restart it"
            ) from exc

    async def push(self, version: int, replicas: Sequence[WeightReceiver]) -> None:
        if self._staged is None or self._staged[0] != version:
            raise EngineError(f"cuda_ipc transport: policy version {version} was not prepared")
        updates = self._staged[1]
        await asyncio.gather(*(self._load(replica, updates, version) for replica in replicas))  # type: ignore[arg-type]
        self.current, self._staged = (version, updates), None

    async def restore(self, replica: WeightReceiver) -> None:
        if self.current is not None:
            version, updates = self.current
            await self._load(replica, updates, version)  # type: ignore[arg-type]

    def close(self) -> None:
        self.current = self._staged = None
        try:
            self.policy.release_weights_ipc()
        except Exception:  # noqa: BLE001 - closing after the workers are gone is not an error
            pass
