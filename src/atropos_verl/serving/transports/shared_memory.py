"""The shared-memory transport: on one host, replicas read the new weights from a file the trainer maps.

For a CPU trainer with vLLM-CPU replicas on the same machine. Both ends of the format:

* trainer end, :class:`SharedMemoryStage` (runs in the policy's rank-0 worker): every full
  tensor, in HF names and the engine's dtype, is copied into one POSIX shared-memory file
  (``/dev/shm/atropos-verl-weights-<run>.bin``, created 0600, back to back at 64-byte
  aligned offsets); a tied ``lm_head`` is left out (engines re-tie it). The file and its
  mapping are kept and reused by every later version, so a sync writes each byte once
  into memory that is already mapped; it grows only when the model does;
* the layout (:func:`layout_entries`: name, dtype, shape, offset, bytes of every tensor)
  travels as JSON in the load call; nothing is serialised but that;
* replica end, ``ReloadWorkerExtension.atropos_verl_load_shared_memory``: the vLLM worker
  maps the file and builds zero-copy tensor views at the offsets. On CPU they go straight
  into the live model and only the packed kernels are rebuilt from them
  (``serving.replicas.vllm_cpu_load``); a model that path does not cover gets them through
  ``reload_weights(weights_iterator=...)`` (checkpoint format: vLLM maps HF names and
  fuses qkv / gate_up itself). Either way each byte is read once from the file.

``prepare`` (gather + copy into the file) runs while replicas serve; ``push`` makes one
call per replica. The file keeps the last pushed version until the next ``prepare``,
so ``restore`` gives a restarted replica the same layout again (syncs and restarts never
overlap). ``close`` removes the file (the worker removes it too; the driver's unlink
covers workers that are already gone).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.base import TransferStats, WeightReceiver, WeightTransport
from atropos_verl.serving.transports.cuda_ipc import skips

# Cache-line alignment: every tensor view is aligned for any dtype and for vectorised copies.
ALIGNMENT = 64
SHM_ROOT = Path("/dev/shm")
PREFIX = "atropos-verl-weights-"


def aligned(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Layout:
    """Where each tensor of one version sits in the file."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.end = 0

    def place(self, name: str, dtype_name: str, shape: Sequence[int], nbytes: int) -> int:
        offset = aligned(self.end)
        self.entries.append(
            {"name": name, "dtype": dtype_name, "shape": [int(d) for d in shape], "offset": offset, "bytes": nbytes}
        )
        self.end = offset + nbytes
        return offset

    @property
    def bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.entries)


def layout_entries(layout: dict[str, Any]) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, offset, bytes) of every tensor; a layout that does not fit its file is refused."""
    size = int(layout["size"])
    entries = []
    for entry in layout["tensors"]:
        offset, nbytes = int(entry["offset"]), int(entry["bytes"])
        if offset < 0 or offset + nbytes > size or offset % ALIGNMENT:
            raise ValueError(
                f"tensor {entry['name']}: bytes [{offset}, {offset + nbytes}) misaligned or past the {size}-byte file"
            )
        entries.append((str(entry["name"]), str(entry["dtype"]), [int(d) for d in entry["shape"]], offset, nbytes))
    return entries


def default_path() -> Path:
    """A name of this run's own: several runs (or tests) on one host never share a file."""
    base = SHM_ROOT if SHM_ROOT.is_dir() and os.access(SHM_ROOT, os.W_OK) else Path("/tmp")
    return base / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}.bin"


class SharedMemoryFile:
    """A file mapped read-write and shared, grown on demand; a uint8 tensor over the mapping."""

    def __init__(self, path: str, *, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        # 0600: the weights are the user's; another account on the host must not read or rewrite them.
        self.fd = os.open(path, flags, 0o600)
        self.map: Optional[mmap.mmap] = None
        self.tensor: Any = None

    @property
    def size(self) -> int:
        return self.map.size() if self.map is not None else 0

    def ensure(self, size: int) -> None:
        """Map at least ``size`` bytes (the file grows; what it held stays)."""
        if size > self.size:
            self.resize(size, populate=False)

    def resize(self, size: int, populate: bool = True) -> None:
        """Make the file exactly ``size`` bytes and map all of it."""
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self.remap(size, populate)

    def remap(self, size: int, populate: bool = True) -> None:
        import torch

        self.tensor = None
        if self.map is not None:
            self.map.close()
        # MAP_POPULATE fills the page tables in one kernel call instead of one fault per page.
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self.map = mmap.mmap(self.fd, size, flags=flags)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)

    def view(self, offset: int, nbytes: int, dtype: Any, shape: Sequence[int]) -> Any:
        return self.tensor[offset : offset + nbytes].view(dtype).view(shape)

    def close(self, unlink: bool = False) -> None:
        self.tensor = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                # A view still alive elsewhere keeps the mapping; it goes with that view.
                pass
            self.map = None
        os.close(self.fd)
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class SharedMemoryStage:
    """Trainer end: the shared-memory file of one worker and the layout of the version it holds."""

    def __init__(self) -> None:
        self.file: Optional[SharedMemoryFile] = None

    def stage(
        self,
        named_tensors: Iterable[tuple[str, Any]],
        *,
        path: str,
        dtype: str,
        writer: bool,
        tied_embeddings: bool,
    ) -> dict[str, Any]:
        """Copy every full tensor into the file at ``path`` (only when ``writer``); every rank walks the tensors.

        Reports the time spent waiting for the gathered tensors (``gather_seconds``) apart
        from the copies into the file (``copy_seconds``).
        """
        import torch

        start = time.perf_counter()
        target = torch.float32 if dtype == "float32" else torch.bfloat16
        if writer and (self.file is None or self.file.path != path):
            self.release()
            self.file = SharedMemoryFile(path, create=True)
        layout = Layout()
        gather_s = copy_s = 0.0
        tick = time.perf_counter()
        for name, tensor in named_tensors:
            gathered = time.perf_counter()
            gather_s += gathered - tick
            if writer and not skips(name, tied_embeddings):
                out_dtype = target if tensor.is_floating_point() else tensor.dtype
                nbytes = tensor.numel() * torch.empty((), dtype=out_dtype).element_size()
                offset = layout.place(name, str(out_dtype).split(".")[-1], tensor.shape, nbytes)
                if layout.end > self.file.size:
                    # First version only: later ones find the file at its final size.
                    self.file.ensure(max(layout.end, 2 * self.file.size, 64 << 20))
                self.file.view(offset, nbytes, out_dtype, tensor.shape).copy_(tensor.detach())
            tick = time.perf_counter()
            copy_s += tick - gathered
        if not writer:
            return {"layout": None, "bytes": 0.0, "seconds": time.perf_counter() - start}
        if self.file.size != layout.end:
            # After growing by doubling (first version): no tmpfs pages beyond the weights.
            self.file.resize(layout.end)
        return {
            "layout": {"path": path, "size": self.file.size, "tensors": layout.entries},
            "bytes": float(layout.bytes),
            "tensors": float(len(layout.entries)),
            "gather_seconds": gather_s,
            "copy_seconds": copy_s,
            "seconds": time.perf_counter() - start,
        }

    def release(self) -> None:
        if self.file is not None:
            self.file.close(unlink=True)
            self.file = None


def read_views(layout: dict[str, Any], file: SharedMemoryFile) -> Iterable[tuple[str, Any]]:
    """(HF name, zero-copy view into ``file``) for every tensor of ``layout``, in the trainer's order."""
    import torch

    for name, dtype_name, shape, offset, nbytes in layout_entries(layout):
        yield name, file.view(offset, nbytes, getattr(torch, dtype_name), shape)


class SharedMemoryPolicyWeights(Protocol):
    """What the transport asks of the policy (the Actor; rank 0's worker does the work)."""

    def stage_weights_shm(self, path: str, dtype: str) -> dict[str, Any]: ...

    def release_weights_shm(self) -> None: ...


class SharedMemoryReceiver(WeightReceiver, Protocol):
    async def load_weights_shm(self, layout: dict[str, Any], version: int, layerwise: bool = False) -> None: ...


class SharedMemoryTransport(WeightTransport):
    name = "shared_memory"

    def __init__(
        self,
        policy: SharedMemoryPolicyWeights,
        *,
        dtype: str,
        path: Optional[Path] = None,
        timeout_s: float = 300,
        layerwise: bool = False,
    ):
        self.policy = policy
        # Replicas take vLLM's layerwise reload even where the direct load applies (benchmarks compare them).
        self.layerwise = layerwise
        self.dtype = dtype
        self.path = path or default_path()
        self.timeout_s = timeout_s
        self.current: Optional[tuple[int, dict[str, Any]]] = None
        self._staged: Optional[tuple[int, dict[str, Any]]] = None
        self.last_stage: dict[str, Any] = {}

    async def prepare(self, version: int) -> TransferStats:
        start = time.perf_counter()
        staged = await asyncio.to_thread(self.policy.stage_weights_shm, str(self.path), self.dtype)
        # The file now holds this version, not the current one any more.
        self.current = None
        self._staged = (version, staged["layout"])
        self.last_stage = {k: v for k, v in staged.items() if k != "layout"}
        return TransferStats(bytes=staged["bytes"], prepare_seconds=time.perf_counter() - start)

    async def _load(self, replica: SharedMemoryReceiver, layout: dict[str, Any], version: int) -> None:
        try:
            await asyncio.wait_for(replica.load_weights_shm(layout, version, self.layerwise), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineError(
                f"{replica.name}: shared-memory weight sync of policy version {version} did not finish within "
                f"{self.timeout_s:g}s; the replica may hold a mix of old and new weights: restart it"
            ) from exc

    async def push(self, version: int, replicas: Sequence[WeightReceiver]) -> None:
        if self._staged is None or self._staged[0] != version:
            raise EngineError(f"shared_memory transport: policy version {version} was not prepared")
        layout = self._staged[1]
        await asyncio.gather(*(self._load(replica, layout, version) for replica in replicas))  # type: ignore[arg-type]
        self.current, self._staged = (version, layout), None

    async def restore(self, replica: WeightReceiver) -> None:
        if self.current is not None:
            version, layout = self.current
            await self._load(replica, layout, version)  # type: ignore[arg-type]

    def close(self) -> None:
        self.current = self._staged = None
        try:
            self.policy.release_weights_shm()
        except Exception:  # noqa: BLE001 - closing after the workers are gone is not an error
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
