"""SGLang's tensor transport: a replica on the trainer's host or GPU loads the weights from trainer memory.

Both ends of SGLang 0.5.12's ``POST /update_weights_from_tensor``:

* trainer end, :class:`TensorStage` (runs in the policy's rank-0 worker, the process that
  owns the memory): every full tensor, in HF names and the engine's dtype, is copied into
  reusable uint8 buckets (:func:`~atropos_verl.serving.transports.cuda_ipc.pack_into_buckets`);
  a tied ``lm_head`` is left out (SGLang re-ties it). The buckets are allocated once and
  reused by every later version; they stay until the next stage or the release, so a
  restarted replica is restored from them. A *payload* is what SGLang's tp worker reads
  with ``MultiprocessingSerializer.deserialize``: base64 of a ``ForkingPickler`` dump of
  ``[(name, tensor), ...]``, every tensor a view into a bucket, so only handles travel;
* replica end, ``SGLangReplica.load_weights_tensors``: the route with one payload per TP
  rank; SGLang rebuilds the views (one mapping per bucket: torch caches opened storages)
  and hands them to ``model.load_weights`` (HF names: it fuses qkv / gate_up itself).

The two media differ only in where the buckets live and in one field of the pickle:

* CPU (``shared_memory``): the buckets are shared-memory storages of torch's
  ``file_system`` strategy (``/dev/shm/torch_*``, opened by name). Torch's default
  ``file_descriptor`` strategy sends fds through multiprocessing's resource sharer,
  whose connection is authenticated with the sender's process authkey, which an unrelated
  SGLang process does not have; so the buckets are allocated and every dump made under
  ``file_system``, set and restored around them in the worker;
* CUDA (``cuda_ipc``): the buckets are CUDA buffers; torch's CUDA reduction puts the device
  *index* in argument 6, which SGLang's patched ``rebuild_cuda_tensor`` also accepts as the
  GPU's UUID: the pickler writes the UUID there, as SGLang's own senders do, so differing
  ``CUDA_VISIBLE_DEVICES`` do not matter. This form is the same code as the CPU one but for
  these two points and has not run yet (no GPU where it was written).

Every dump increments the shared storages' reference counts once per view and each receiver
balances exactly those it unpickles, so a payload is good for one load by one TP rank:
every load gets a fresh dump (a few milliseconds: metadata only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copyreg
import io
import logging
import time
from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional, Protocol, Sequence

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.base import TransferStats, WeightReceiver, WeightTransport
from atropos_verl.serving.transports.cuda_ipc import pack_into_buckets

logger = logging.getLogger(__name__)

# The device argument of torch's CUDA tensor reduction (torch.multiprocessing.reductions.reduce_tensor).
CUDA_DEVICE_ARG = 6
MEDIA = {"cpu": "shared_memory", "cuda": "cuda_ipc"}


@contextlib.contextmanager
def sharing_strategy(strategy: str) -> Iterator[None]:
    import torch.multiprocessing as tmp

    previous = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy(strategy)
    try:
        yield
    finally:
        tmp.set_sharing_strategy(previous)


def _reduce_tensor_by_uuid(tensor: Any) -> tuple:
    from torch.multiprocessing.reductions import reduce_tensor

    rebuild, args = reduce_tensor(tensor)
    if tensor.is_cuda:
        import torch

        args = list(args)
        args[CUDA_DEVICE_ARG] = str(torch.cuda.get_device_properties(args[CUDA_DEVICE_ARG]).uuid)
        args = tuple(args)
    return rebuild, args


def dump_named_tensors(named_tensors: Sequence[tuple[str, Any]]) -> str:
    """SGLang's serialized form of ``named_tensors`` (CPU tensors must be in shared memory)."""
    # Importing torch registers its reducers (storages, tensors) with ForkingPickler.
    import torch

    class Pickler(ForkingPickler):
        dispatch_table = {
            **copyreg.dispatch_table,
            **ForkingPickler._extra_reducers,
            torch.Tensor: _reduce_tensor_by_uuid,
        }

    buffer = io.BytesIO()
    with sharing_strategy("file_system"):
        Pickler(buffer).dump(list(named_tensors))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class TensorStage:
    """Trainer end: the reusable buckets of one worker and the views of the version they hold."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.views: list[tuple[str, Any]] = []

    def _allocate(self, capacity: int, device: str) -> Any:
        import torch

        if device == "cuda":
            return torch.empty(capacity, dtype=torch.uint8, device="cuda")
        with sharing_strategy("file_system"):
            return torch.empty(capacity, dtype=torch.uint8).share_memory_()

    def stage(
        self,
        named_tensors: Iterable[tuple[str, Any]],
        *,
        bucket_bytes: int,
        dtype: str,
        device: str,
        writer: bool,
        tied_embeddings: bool,
        payloads: int,
    ) -> dict[str, Any]:
        """Copy every full tensor into the buckets (only when ``writer``) and dump ``payloads`` payloads of them.

        Every rank must walk ``named_tensors`` (each full tensor is an all-gather).
        """
        import torch

        start = time.perf_counter()
        packer, views = pack_into_buckets(
            named_tensors,
            self.buffers,
            lambda capacity: self._allocate(capacity, device),
            bucket_bytes=bucket_bytes,
            dtype=dtype,
            writer=writer,
            tied_embeddings=tied_embeddings,
        )
        copied = time.perf_counter()
        if not writer:
            return {"payloads": [], "bytes": 0.0, "tensors": 0.0, "seconds": copied - start}
        if device == "cuda":
            torch.cuda.current_stream().synchronize()
        self.views = views
        return {
            "payloads": self.payloads(payloads),
            "bytes": float(sum(b.used for b in packer.buckets)),
            "tensors": float(len(views)),
            "buckets": float(len(self.buffers)),
            "copy_seconds": copied - start,
            "seconds": time.perf_counter() - start,
        }

    def payloads(self, count: int) -> list[str]:
        """``count`` fresh dumps of the version the buckets hold (one per receiving TP rank)."""
        if not self.views:
            raise RuntimeError("no weights staged: stage them before asking for payloads")
        return [dump_named_tensors(self.views) for _ in range(count)]

    def release(self) -> None:
        import torch

        self.views = []
        self.buffers.clear()
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()


class TensorPolicyWeights(Protocol):
    """What the transport asks of the policy (the Actor; rank 0's worker does the work)."""

    def stage_weights_tensors(self, bucket_bytes: int, dtype: str, payloads: int) -> dict[str, Any]: ...

    def weights_tensor_payloads(self, count: int) -> list[str]: ...

    def release_weights_tensors(self) -> None: ...


class TensorReceiver(WeightReceiver, Protocol):
    tensor_parallel_size: int

    async def load_weights_tensors(self, payloads: list[str], version: int) -> None: ...


class SGLangTensorTransport(WeightTransport):
    """``prepare`` stages (copies + dumps) while replicas serve; ``push`` only makes the HTTP calls."""

    def __init__(
        self,
        policy: TensorPolicyWeights,
        *,
        medium: str,
        dtype: str,
        receivers: int,
        bucket_bytes: int = 512 << 20,
        timeout_s: float = 300,
    ):
        if medium not in MEDIA.values():
            raise ValueError(f"medium must be one of {sorted(MEDIA.values())}, got {medium!r}")
        self.name = medium
        self.policy = policy
        self.dtype = dtype
        self.receivers = receivers
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.current: Optional[int] = None
        self._staged: Optional[tuple[int, list[str]]] = None
        self.last_stage: dict[str, Any] = {}

    async def prepare(self, version: int) -> TransferStats:
        start = time.perf_counter()
        staged = await asyncio.to_thread(
            self.policy.stage_weights_tensors, self.bucket_bytes, self.dtype, self.receivers
        )
        # The buckets now hold this version, not the current one any more.
        self.current = None
        self._staged = (version, list(staged["payloads"]))
        self.last_stage = {k: v for k, v in staged.items() if k != "payloads"}
        return TransferStats(bytes=staged["bytes"], prepare_seconds=time.perf_counter() - start)

    async def _load(self, replica: TensorReceiver, payloads: list[str], version: int) -> None:
        try:
            await asyncio.wait_for(replica.load_weights_tensors(payloads, version), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineError(
                f"{replica.name}: weight sync of policy version {version} through /update_weights_from_tensor "
                f"({self.name}) did not finish within {self.timeout_s:g}s; the replica may hold a mix of old and "
                "new weights: restart it"
            ) from exc

    async def push(self, version: int, replicas: Sequence[WeightReceiver]) -> None:
        if self._staged is None or self._staged[0] != version:
            raise EngineError(f"{self.name} transport: policy version {version} was not prepared")
        payloads = self._staged[1]
        wanted = sum(replica.tensor_parallel_size for replica in replicas)  # type: ignore[attr-defined]
        if len(payloads) < wanted:
            payloads += await asyncio.to_thread(self.policy.weights_tensor_payloads, wanted - len(payloads))
        loads = []
        for replica in replicas:
            share, payloads = payloads[: replica.tensor_parallel_size], payloads[replica.tensor_parallel_size :]  # type: ignore[attr-defined]
            loads.append(self._load(replica, share, version))  # type: ignore[arg-type]
        self._staged = None
        await asyncio.gather(*loads)
        self.current = version

    async def restore(self, replica: WeightReceiver) -> None:
        if self.current is not None:
            count = replica.tensor_parallel_size  # type: ignore[attr-defined]
            payloads = await asyncio.to_thread(self.policy.weights_tensor_payloads, count)
            await self._load(replica, payloads, self.current)  # type: ignore[arg-type]

    def close(self) -> None:
        self.current = self._staged = None
        try:
            self.policy.release_weights_tensors()
        except Exception:  # noqa: BLE001 - closing after the workers are gone is not an error
            pass
