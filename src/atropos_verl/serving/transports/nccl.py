"""The NCCL transport: replicas on other GPUs receive the new weights by broadcast from the trainer's rank 0.

Written against vLLM 0.24's NCCL weight-transfer engine (the GPU stack verl pins); it
has not run on a GPU yet (the multi-GPU issue runs it). Both ends of the format:

* group: one process group for the trainer and every replica. The trainer's rank-0
  worker is rank 0 and hosts the rendezvous on ``master_address:master_port``; replica
  ``i``'s workers take consecutive ranks after the earlier replicas' (``rank_offset``,
  :func:`rank_offsets`). vLLM's ``/init_weight_transfer_engine`` and the trainer's
  ``trainer_init`` both block until every rank joined, so they run concurrently;
* manifest: names (HF), engine dtypes and shapes of every tensor, tied ``lm_head``
  left out, in the order the trainer walks its parameters. vLLM's worker receives the
  broadcast knowing only this manifest, so it derives the chunk boundaries itself:
  tensors are taken until their running byte total *exceeds* the buffer size, then
  one uint8 chunk is broadcast (:func:`chunk_layout` is that rule; the trainer packs
  by it, :class:`NcclSender`);
* update: ``/start_weight_update`` (checkpoint format: vLLM maps HF names and fuses
  qkv / gate_up), then, concurrently, every replica's ``/update_weights`` (packed,
  same buffer size and buffer count) and the trainer's broadcasts, then
  ``/finish_weight_update``.

A silent NCCL hang is the most reported sync failure of such setups, so the collective
runs on a worker thread (the blocking call into the trainer's worker) while the main
loop holds the replicas' HTTP calls under ``timeout_s``; a replica that does not answer
in time fails the sync with an error naming it, and the group is marked broken (a hung
collective cannot be joined again): the next sync rebuilds it. If the trainer's own
broadcast is what hangs, its worker stays blocked (Ray runs one call at a time there),
so the rebuild waits behind it: the error is what the run gets, never a silent hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.base import TransferStats, WeightReceiver, WeightTransport
from atropos_verl.serving.transports.cuda_ipc import skips

logger = logging.getLogger(__name__)

# vLLM 0.24's defaults for packed NCCL updates (one chunk in flight while the next is packed).
PACKED_NUM_BUFFERS = 2


@dataclass(frozen=True)
class Manifest:
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    sizes: list[int]

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def chunk_layout(sizes: Sequence[int], buffer_bytes: int) -> list[list[int]]:
    """Tensor indices of each broadcast chunk, as vLLM's packed consumer cuts them.

    A chunk takes tensors until its byte total exceeds ``buffer_bytes`` (so it may be
    larger than the buffer by its last tensor); the rest forms a last, smaller chunk.
    """
    if buffer_bytes < 1:
        raise ValueError("buffer_bytes must be positive")
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        current.append(index)
        total += size
        if total > buffer_bytes:
            chunks.append(current)
            current, total = [], 0
    if current:
        chunks.append(current)
    return chunks


def rank_offsets(world_sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each replica's first rank (the trainer is rank 0) and the group's world size."""
    offsets, rank = [], 1
    for size in world_sizes:
        if size < 1:
            raise ValueError(f"a replica reports world size {size}")
        offsets.append(rank)
        rank += size
    return offsets, rank


def update_info(manifest: Manifest, buffer_bytes: int) -> dict[str, Any]:
    """vLLM 0.24's packed ``NCCLWeightTransferUpdateInfo`` in its HTTP form."""
    return {
        "names": list(manifest.names),
        "dtype_names": list(manifest.dtype_names),
        "shapes": [list(s) for s in manifest.shapes],
        "packed": True,
        "packed_buffer_size_bytes": buffer_bytes,
        "packed_num_buffers": PACKED_NUM_BUFFERS,
    }


def build_manifest(
    named_shapes: Iterable[tuple[str, Any, Sequence[int]]], dtype: str, tied_embeddings: bool
) -> Manifest:
    """The manifest for parameters given as (name, torch dtype, shape), cast to the engine ``dtype``."""
    import torch

    target = torch.float32 if dtype == "float32" else torch.bfloat16
    names, dtype_names, shapes, sizes = [], [], [], []
    for name, tensor_dtype, shape in named_shapes:
        if skips(name, tied_embeddings):
            continue
        out = target if tensor_dtype.is_floating_point else tensor_dtype
        numel = 1
        for d in shape:
            numel *= int(d)
        names.append(name)
        dtype_names.append(str(out).split(".")[-1])
        shapes.append([int(d) for d in shape])
        sizes.append(numel * torch.empty((), dtype=out).element_size())
    return Manifest(names, dtype_names, shapes, sizes)


class BroadcastGroup(Protocol):
    """The collective the sender needs (vLLM's ``PyNcclCommunicator``; gloo or a fake in tests)."""

    def broadcast(self, tensor: Any, src: int) -> Any: ...


class NcclSender:
    """Trainer end, in the rank-0 worker: packs the walked tensors by :func:`chunk_layout` and broadcasts them.

    ``device`` is where the chunks are built (the trainer's GPU; the CPU with gloo in
    tests). A chunk stays referenced until the broadcast two chunks later was issued,
    so an asynchronous collective never reads freed memory.
    """

    def __init__(self, group: BroadcastGroup, device: Any, synchronize: Callable[[], None] = lambda: None):
        self.group = group
        self.device = device
        self.synchronize = synchronize

    def send(self, named_tensors: Iterator[tuple[str, Any]], manifest: Manifest, buffer_bytes: int) -> dict[str, float]:
        """Broadcast ``named_tensors`` (the manifest's tensors, in its order; others are skipped) in chunks."""
        import torch

        start = time.perf_counter()
        expected = {name: i for i, name in enumerate(manifest.names)}
        in_flight: list[Any] = []
        pending: list[Any] = []
        chunks = chunk_layout(manifest.sizes, buffer_bytes)
        chunk_of = {index: c for c, chunk in enumerate(chunks) for index in chunk}
        position = 0
        for name, tensor in named_tensors:
            if name not in expected:
                continue
            index = expected[name]
            if index != position:
                raise EngineError(
                    f"NCCL sync: parameter {name} comes at position {position}, the manifest has it at {index}; "
                    "the replicas would unpack the broadcast into the wrong tensors"
                )
            value = tensor.detach().to(self.device, dtype=getattr(torch, manifest.dtype_names[index]))
            pending.append(value.contiguous().view(-1).view(torch.uint8))
            position += 1
            if position == len(manifest.names) or chunk_of[position] != chunk_of[index]:
                chunk = torch.cat(pending) if len(pending) > 1 else pending[0]
                pending = []
                self.group.broadcast(chunk, src=0)
                in_flight = (in_flight + [chunk])[-PACKED_NUM_BUFFERS:]
        if position != len(manifest.names):
            missing = manifest.names[position]
            raise EngineError(f"NCCL sync: the trainer has no parameter {missing} of the manifest")
        self.synchronize()
        return {"bytes": float(manifest.bytes), "chunks": float(len(chunks)), "seconds": time.perf_counter() - start}


class NcclPolicyWeights(Protocol):
    """What the transport asks of the policy (the Actor; rank 0's worker does the work)."""

    def nccl_manifest(self, dtype: str) -> dict[str, Any]: ...

    def init_weights_nccl(self, master_address: str, master_port: int, world_size: int) -> None: ...

    def send_weights_nccl(self, dtype: str, buffer_bytes: int) -> dict[str, float]: ...

    def release_weights_nccl(self) -> None: ...


class NcclReceiver(WeightReceiver, Protocol):
    async def weight_transfer_world_size(self) -> int: ...

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None: ...

    async def start_weight_update(self) -> None: ...

    async def update_weights(self, update_info: dict[str, Any]) -> None: ...

    async def finish_weight_update(self, version: int) -> None: ...


class NcclTransport(WeightTransport):
    name = "nccl"

    def __init__(
        self,
        policy: NcclPolicyWeights,
        *,
        dtype: str,
        master_address: str = "127.0.0.1",
        master_port: int,
        buffer_bytes: int = 512 << 20,
        timeout_s: float = 300,
    ):
        self.policy = policy
        self.dtype = dtype
        self.master_address = master_address
        self.master_port = master_port
        self.buffer_bytes = buffer_bytes
        self.timeout_s = timeout_s
        self.manifest: Optional[Manifest] = None
        self.members: list[str] = []
        self.broken: Optional[str] = None
        self.current_version: Optional[int] = None
        self.last_send: dict[str, float] = {}

    async def _within(self, what: str, replica_name: str, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except asyncio.TimeoutError as exc:
            self.broken = f"{replica_name} did not finish {what}"
            raise EngineError(
                f"{replica_name}: NCCL weight sync: {what} did not finish within {self.timeout_s:g}s (a hung "
                "collective or a dead replica); the replica may hold a mix of old and new weights: restart it"
            ) from exc

    async def _form_group(self, replicas: Sequence[NcclReceiver]) -> None:
        """One group for the trainer and all ``replicas``; every member joins at once."""
        if self.members:
            await asyncio.to_thread(self.policy.release_weights_nccl)
            self.members = []
        sizes = await asyncio.gather(
            *(self._within("/get_world_size", r.name, r.weight_transfer_world_size()) for r in replicas)
        )
        offsets, world_size = rank_offsets(sizes)
        trainer = asyncio.create_task(
            asyncio.to_thread(self.policy.init_weights_nccl, self.master_address, self.master_port, world_size)
        )
        joins = [
            self._within(
                "joining the weight-transfer group",
                replica.name,
                replica.init_weight_transfer(
                    {
                        "master_address": self.master_address,
                        "master_port": self.master_port,
                        "rank_offset": offset,
                        "world_size": world_size,
                    }
                ),
            )
            for replica, offset in zip(replicas, offsets)
        ]
        await asyncio.gather(*joins)
        await self._within("joining the weight-transfer group", "the trainer", trainer)
        self.members = [r.name for r in replicas]
        self.broken = None

    async def prepare(self, version: int) -> TransferStats:
        start = time.perf_counter()
        if self.manifest is None:
            raw = await asyncio.to_thread(self.policy.nccl_manifest, self.dtype)
            self.manifest = Manifest(raw["names"], raw["dtype_names"], raw["shapes"], raw["sizes"])
        return TransferStats(bytes=float(self.manifest.bytes), prepare_seconds=time.perf_counter() - start)

    async def push(self, version: int, replicas: Sequence[WeightReceiver]) -> None:
        if self.manifest is None:
            raise EngineError(f"nccl transport: policy version {version} was not prepared")
        members: Sequence[NcclReceiver] = replicas  # type: ignore[assignment]
        if self.broken is not None or self.members != [r.name for r in members]:
            await self._form_group(members)
        await asyncio.gather(*(self._within("/start_weight_update", r.name, r.start_weight_update()) for r in members))
        info = update_info(self.manifest, self.buffer_bytes)
        # The broadcast blocks its thread until every replica has received; the replicas'
        # HTTP calls return only after their workers loaded it. Both sides run at once.
        sender = asyncio.create_task(asyncio.to_thread(self.policy.send_weights_nccl, self.dtype, self.buffer_bytes))
        try:
            await asyncio.gather(*(self._within("/update_weights", r.name, r.update_weights(info)) for r in members))
            self.last_send = await self._within("the broadcast", "the trainer", sender)
        except BaseException:
            # The worker thread cannot be interrupted; it ends when the group is torn down.
            sender.cancel()
            self.broken = self.broken or "an update failed mid-broadcast"
            raise
        await asyncio.gather(
            *(self._within("/finish_weight_update", r.name, r.finish_weight_update(version)) for r in members)
        )
        self.current_version = version

    async def restore(self, replica: WeightReceiver) -> None:
        """Refused: a restarted replica left the group with its old process, and rebuilding the group
        means loading into every replica while the others serve (vLLM's layers sit on the meta
        device during an update). A replica serving its start weights would be worse than failing."""
        self.broken = f"{replica.name} restarted"
        if self.current_version is not None:
            raise EngineError(
                f"{replica.name}: restarted, but the NCCL transport cannot give one replica the current weights "
                f"(policy version {self.current_version}) while the others serve; use "
                "engine.weight_transport=folder for runs that must survive replica restarts"
            )

    def close(self) -> None:
        try:
            self.policy.release_weights_nccl()
        except Exception:  # noqa: BLE001 - closing after the workers are gone is not an error
            pass
        self.members = []
