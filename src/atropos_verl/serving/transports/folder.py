"""The folder transport: safetensors buckets on a node-local tmpfs, reloaded in place by each replica.

Both ends of the format live here:

* trainer end, :func:`write_weights` (runs in the policy's rank-0 worker): every full
  tensor, in HF names and the engine's dtype, goes into ``model-NNNNN.safetensors``
  files of about ``bucket_bytes``; a tied ``lm_head`` is left out (engines re-tie it);
* layout: version ``v`` is written to ``<root>/.v<v>.tmp`` and renamed to
  ``<root>/v<v>`` once complete, so a replica never sees a half-written folder; the
  previous version's folder is removed once the new one is everywhere;
* replica end, :func:`require_weights`: a folder is accepted only with safetensors in
  it, then the replica reloads it in place (``InferenceReplica.load_weights``).

``/dev/shm`` makes the write and the reload memory copies; it is the fallback that
works for every engine and version, on CPU and GPU.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Sequence

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.base import PolicyWeights, TransferStats, WeightReceiver, WeightTransport


def write_weights(
    named_tensors: Iterable[tuple[str, Any]],
    out_dir: str,
    *,
    bucket_bytes: int,
    dtype: str,
    writer: bool,
    tied_embeddings: bool,
) -> dict[str, float]:
    """Write the policy's full tensors as safetensors buckets into ``out_dir`` (only when ``writer``).

    Every rank must walk ``named_tensors`` (each full tensor is an all-gather of FSDP
    shards); only one tensor plus one bucket is held at a time, never a second full
    copy of the model.
    """
    import torch
    from safetensors.torch import save_file

    start = time.perf_counter()
    target = torch.float32 if dtype == "float32" else torch.bfloat16
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    bucket: dict[str, torch.Tensor] = {}
    bucket_size = total_bytes = files = tensors = 0
    for name, tensor in named_tensors:
        # A tied output projection is the input embedding: writing both names would store it twice.
        if not writer or (tied_embeddings and name == "lm_head.weight"):
            continue
        value = tensor.detach().to("cpu", dtype=target if tensor.is_floating_point() else tensor.dtype).contiguous()
        bucket[name] = value
        size = value.numel() * value.element_size()
        bucket_size += size
        total_bytes += size
        tensors += 1
        if bucket_size >= bucket_bytes:
            save_file(bucket, os.path.join(out_dir, f"model-{files:05d}.safetensors"))
            files += 1
            bucket, bucket_size = {}, 0
    if writer and bucket:
        save_file(bucket, os.path.join(out_dir, f"model-{files:05d}.safetensors"))
        files += 1
    return {
        "bytes": float(total_bytes),
        "tensors": float(tensors),
        "files": float(files),
        "seconds": time.perf_counter() - start,
    }


def require_weights(replica: object, weights_dir: str) -> Path:
    """The folder a replica will load, resolved; an engine would fail deep in its loader instead."""
    path = Path(weights_dir).resolve()
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise EngineError(f"{replica}: no *.safetensors files in {path}")
    return path


def default_weights_root() -> Path:
    """A private folder on tmpfs when the machine has one (the sync is then a memory copy)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="atropos-verl-weights-", dir=base))


class VersionFolderTransport(WeightTransport):
    """A transport that exports each policy version into its own folder ``<root>/v<version>`` for replicas to load.

    The export goes to ``<root>/.v<version>.tmp`` and is renamed once complete, so a replica
    never sees a half-written folder. Once a version is in every replica, the folders of
    versions older than the last ``kept_previous`` ones before it are removed.
    """

    # Folders of versions before the current one that stay on disk.
    kept_previous = 0

    def __init__(self, policy: Any, *, root: Path, dtype: str):
        self.policy = policy
        self.root = root
        self.dtype = dtype
        self.current: Optional[tuple[int, Path]] = None
        self._staged: Optional[tuple[int, Path]] = None
        self._retired: list[Path] = []

    def folder(self, version: int) -> Path:
        return self.root / f"v{version}"

    @abc.abstractmethod
    def export(self, out_dir: Path) -> dict[str, float]:
        """Write the policy's current version into ``out_dir`` (runs in a thread); its ``bytes`` at least."""

    @abc.abstractmethod
    async def load(self, replica: Any, folder: Path, version: int) -> None:
        """Have ``replica`` serve the version exported into ``folder``."""

    def served(self, version: int) -> None:
        """Runs once every replica holds ``version``, while they are still paused."""

    async def prepare(self, version: int) -> TransferStats:
        start = time.perf_counter()
        staging, target = self.root / f".v{version}.tmp", self.folder(version)
        # Left over when an earlier attempt at this version failed after exporting.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        exported = await asyncio.to_thread(self.export, staging)
        staging.rename(target)
        self._staged = (version, target)
        return TransferStats(bytes=exported["bytes"], prepare_seconds=time.perf_counter() - start)

    async def push(self, version: int, replicas: Sequence[Any]) -> None:
        if self._staged is None or self._staged[0] != version:
            raise EngineError(f"{self.name} transport: policy version {version} was not prepared")
        folder = self._staged[1]
        await asyncio.gather(*(self.load(replica, folder, version) for replica in replicas))
        self.served(version)
        if self.current is not None and self.current[1] != folder:
            self._retired.append(self.current[1])
            while len(self._retired) > self.kept_previous:
                shutil.rmtree(self._retired.pop(0), ignore_errors=True)
        self.current, self._staged = (version, folder), None

    async def restore(self, replica: Any) -> None:
        if self.current is not None:
            version, folder = self.current
            await self.load(replica, folder, version)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class FolderTransport(VersionFolderTransport):
    name = "folder"

    def __init__(self, policy: PolicyWeights, *, root: Path, dtype: str, bucket_bytes: int = 512 << 20):
        super().__init__(policy, root=root, dtype=dtype)
        self.bucket_bytes = bucket_bytes

    def export(self, out_dir: Path) -> dict[str, float]:
        return self.policy.export_weights(str(out_dir), self.bucket_bytes, self.dtype)

    async def load(self, replica: WeightReceiver, folder: Path, version: int) -> None:
        await replica.load_weights(str(folder), version)
