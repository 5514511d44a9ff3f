"""SGLang's distributed transport: split-placement replicas receive the weights by broadcast from the trainer's rank 0.

Both ends of SGLang 0.5.12's ``/init_weights_update_group``, ``/update_weights_from_distributed``
and ``/destroy_weights_update_group`` (``srt/entrypoints/http_server.py``; the scheduler's side
is ``ModelRunner.init_weights_update_group`` / ``update_weights_from_distributed`` in
``srt/model_executor/model_runner.py``):

* group: one torch process group for the trainer and every replica, joined through a TCP
  store on ``master_address:master_port`` that the trainer's rank-0 worker hosts. Each SGLang
  TP worker takes rank ``rank_offset + tp_rank`` (:func:`~.nccl.rank_offsets`; SGLang refuses
  ``dp_size > 1``). The request names the backend: ``nccl`` when the trainer is on CUDA,
  ``gloo`` on CPU, where the same route runs against SGLang-CPU (verified live, see
  ``tests/integration/test_sglang.py``). SGLang builds its side with torch's
  ``_new_process_group_helper`` under a ``PrefixStore(group_name)`` (``srt/utils/common.py``
  ``init_custom_process_group``); the store keys the backends use depend on that exact
  layout (gloo connects a pair of backends, ``cpu/`` and ``cuda/``, at construction), so
  :class:`UpdateGroup` joins through the same torch helper rather than rebuilding the layout.
  Both ends must therefore run torch versions that lay out a group alike (2.13 on both here);
* update: per bucket, one ``/update_weights_from_distributed`` with ``load_format:
  flattened_bucket`` and the bucket's names (HF), dtypes and shapes, while the trainer
  broadcasts the bucket as one uint8 tensor: the tensors' bytes back to back in the request's
  order, which is how SGLang's ``FlattenedTensorBucket`` splits it
  (``srt/weight_sync/tensor_bucket.py``). The buckets are :func:`~.nccl.chunk_layout`'s, so
  :class:`~.nccl.NcclSender` packs them as for vLLM; a tied ``lm_head`` is left out (SGLang
  re-ties it). Only the last bucket carries ``weight_version`` and the cache flush.

The receiving collective blocks SGLang's scheduler until the trainer broadcasts (gloo's and
NCCL's own timeouts are minutes to half an hour), so every replica call runs under
``timeout_s`` and the trainer's broadcasts run on a worker thread; a call that does not come
back fails the sync with an error naming the replica and marks the group broken: the next
sync forms a new one under a new name and port (a hung group cannot be joined again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional, Protocol, Sequence

from atropos_verl.netutil import free_port
from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.base import WeightReceiver
from atropos_verl.serving.transports.nccl import Manifest, NcclTransport, chunk_layout, rank_offsets

GROUP_PREFIX = "atropos_verl_weights"


def group_backend(device: str) -> str:
    """The collective backend for a trainer on ``device``: NCCL between GPUs, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def bucket_requests(
    manifest: Manifest, buffer_bytes: int, group_name: str, version: int, flush_cache: bool
) -> list[dict]:
    """The ``/update_weights_from_distributed`` bodies of one update, one per broadcast bucket, in order."""
    chunks = chunk_layout(manifest.sizes, buffer_bytes)
    bodies = []
    for number, chunk in enumerate(chunks):
        last = number == len(chunks) - 1
        bodies.append(
            {
                "names": [manifest.names[i] for i in chunk],
                "dtypes": [manifest.dtype_names[i] for i in chunk],
                "shapes": [list(manifest.shapes[i]) for i in chunk],
                "group_name": group_name,
                "load_format": "flattened_bucket",
                # Flushing between buckets would recompute nothing useful: the weights are half new.
                "flush_cache": flush_cache and last,
                "weight_version": str(version) if last else None,
            }
        )
    return bodies


class UpdateGroup:
    """The trainer's end of the group: rank 0, host of the rendezvous store; broadcasts synchronously."""

    def __init__(self, group: Any, store: Any = None):
        self.group = group
        # The rendezvous server lives in this object: the replicas' backends keep talking to it.
        self.store = store

    @classmethod
    def join(
        cls, master_address: str, master_port: int, world_size: int, *, backend: str, group_name: str, timeout_s: float
    ) -> "UpdateGroup":
        """Host the store and join as rank 0; returns once every rank joined (or raises after ``timeout_s``)."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout)
        group, _ = c10d._new_process_group_helper(
            world_size,
            0,
            [],
            dist.Backend(backend),
            dist.PrefixStore(group_name, store),
            group_name=group_name,
            timeout=timeout,
        )
        # What torch's public collectives and destroy_process_group look the group's ranks up in.
        c10d._world.pg_group_ranks[group] = {rank: rank for rank in range(world_size)}
        return cls(group, store)

    def broadcast(self, tensor: Any, src: int) -> Any:
        import torch.distributed as dist

        dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def destroy(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group(self.group)


class SGLangNcclPolicyWeights(Protocol):
    """What the transport asks of the policy (the Actor; rank 0's worker does the work)."""

    def nccl_manifest(self, dtype: str) -> dict[str, Any]: ...

    def init_weights_sglang_group(
        self, master_address: str, master_port: int, world_size: int, backend: str, group_name: str, timeout_s: float
    ) -> None: ...

    def send_weights_nccl(self, dtype: str, buffer_bytes: int) -> dict[str, float]: ...

    def release_weights_nccl(self) -> None: ...


class SGLangNcclReceiver(WeightReceiver, Protocol):
    @property
    def tensor_parallel_size(self) -> int: ...

    async def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
    ) -> None: ...

    async def update_weights_from_distributed(self, body: dict[str, Any], version: int, final: bool) -> None: ...

    async def destroy_weights_update_group(self, group_name: str) -> None: ...

    @property
    def flushes_cache(self) -> bool: ...


@dataclass
class _Formation:
    name: str
    port: int
    members: list[str] = field(default_factory=list)


class SGLangNcclTransport(NcclTransport):
    """:class:`~.nccl.NcclTransport`'s group handling and timeouts, with SGLang's routes and bucket format."""

    name = "nccl"

    def __init__(
        self,
        policy: SGLangNcclPolicyWeights,
        *,
        dtype: str,
        device: str,
        master_address: str = "127.0.0.1",
        ports: Callable[[], int] = free_port,
        buffer_bytes: int = 512 << 20,
        timeout_s: float = 300,
    ):
        super().__init__(
            policy,  # type: ignore[arg-type]
            dtype=dtype,
            master_address=master_address,
            master_port=0,
            buffer_bytes=buffer_bytes,
            timeout_s=timeout_s,
        )
        self.sglang_policy = policy
        self.backend = group_backend(device)
        self.ports = ports
        self.formations = 0
        self.formation: Optional[_Formation] = None
        self._replicas: Sequence[SGLangNcclReceiver] = ()

    async def _leave(self) -> None:
        """Best effort: a broken group may not answer, and the next one uses a fresh name and port."""
        formation, self.formation = self.formation, None
        self.members = []
        if formation is None:
            return
        await asyncio.to_thread(self.sglang_policy.release_weights_nccl)
        for replica in self._replicas:
            if replica.name in formation.members:
                try:
                    await asyncio.wait_for(replica.destroy_weights_update_group(formation.name), self.timeout_s)
                except (EngineError, asyncio.TimeoutError):
                    pass

    async def _form_group(self, replicas: Sequence[SGLangNcclReceiver]) -> None:  # type: ignore[override]
        await self._leave()
        self.formations += 1
        formation = _Formation(f"{GROUP_PREFIX}_{self.formations}", self.ports())
        offsets, world_size = rank_offsets([r.tensor_parallel_size for r in replicas])
        trainer = asyncio.create_task(
            asyncio.to_thread(
                self.sglang_policy.init_weights_sglang_group,
                self.master_address,
                formation.port,
                world_size,
                self.backend,
                formation.name,
                self.timeout_s,
            )
        )
        joins = [
            self._within(
                f"joining the weight-update group ({self.backend})",
                replica.name,
                replica.init_weights_update_group(
                    self.master_address, formation.port, offset, world_size, formation.name, self.backend
                ),
            )
            for replica, offset in zip(replicas, offsets)
        ]
        try:
            await asyncio.gather(*joins)
        except Exception:
            # The trainer's join gives up by itself (its store's timeout); the replica's error is the one to report.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(trainer, self.timeout_s)
            raise
        await self._within(f"joining the weight-update group ({self.backend})", "the trainer", trainer)
        formation.members = [r.name for r in replicas]
        self.formation = formation
        self.members = list(formation.members)
        self.broken = None

    async def push(self, version: int, replicas: Sequence[WeightReceiver]) -> None:
        if self.manifest is None:
            raise EngineError(f"nccl transport: policy version {version} was not prepared")
        members: Sequence[SGLangNcclReceiver] = replicas  # type: ignore[assignment]
        self._replicas = members
        if self.broken is not None or self.formation is None or self.members != [r.name for r in members]:
            await self._form_group(members)
        assert self.formation is not None
        manifest, group_name = self.manifest, self.formation.name
        start = time.perf_counter()
        send = self.sglang_policy.send_weights_nccl
        sender = asyncio.create_task(asyncio.to_thread(send, self.dtype, self.buffer_bytes))

        async def receive(replica: SGLangNcclReceiver) -> None:
            bodies = bucket_requests(manifest, self.buffer_bytes, group_name, version, replica.flushes_cache)
            for number, body in enumerate(bodies):
                await self._within(
                    f"/update_weights_from_distributed (bucket {number + 1} of {len(bodies)})",
                    replica.name,
                    replica.update_weights_from_distributed(body, version, final=number == len(bodies) - 1),
                )

        try:
            await asyncio.gather(*(receive(r) for r in members))
            self.last_send = await self._within("the broadcast", "the trainer", sender)
        except BaseException:
            # The worker thread cannot be interrupted; it ends when the group is torn down.
            sender.cancel()
            self.broken = self.broken or "an update failed mid-broadcast"
            raise
        self.last_send["push_seconds"] = time.perf_counter() - start
        self.current_version = version

    def close(self) -> None:
        super().close()
        self.formation = None
