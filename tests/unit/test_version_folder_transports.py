"""The folder and LoRA-adapter transports' bookkeeping: one folder per version, staged, served, retired."""

import asyncio
from pathlib import Path

import pytest

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.lora import AdapterTransport
from atropos_verl.serving.transports.folder import FolderTransport


class Policy:
    """Writes a marker file per export (the real exports are covered by the weight-sync integration tests)."""

    def __init__(self):
        self.exports = 0

    def _write(self, out_dir: str, name: str) -> dict[str, float]:
        self.exports += 1
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / name).write_text(str(self.exports))
        return {"bytes": 10.0 * self.exports}

    def export_weights(self, out_dir: str, bucket_bytes: int, dtype: str) -> dict[str, float]:
        return self._write(out_dir, "model-00000.safetensors")

    def export_adapter(self, out_dir: str, dtype: str) -> dict[str, float]:
        return self._write(out_dir, "adapter_model.safetensors")


class Replica:
    name = "replica"

    def __init__(self):
        self.policy_version = 0
        self.loaded: list[tuple[str, int]] = []

    async def _load(self, folder: str, version: int) -> None:
        # A replica only ever sees a complete folder.
        assert any(Path(folder).iterdir()), folder
        self.loaded.append((Path(folder).name, version))
        self.policy_version = version

    load_weights = load_adapter = _load


def versions_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def sync(transport, version: int, replicas) -> float:
    stats = asyncio.run(transport.prepare(version))
    asyncio.run(transport.push(version, replicas))
    return stats.bytes


def test_folder_transport_keeps_only_the_current_version(tmp_path):
    transport = FolderTransport(Policy(), root=tmp_path / "weights", dtype="float32")
    replicas = [Replica(), Replica()]

    for version in (1, 2, 3):
        assert sync(transport, version, replicas) == 10.0 * version
        assert versions_on_disk(transport.root) == [f"v{version}"]
    assert all(r.loaded == [("v1", 1), ("v2", 2), ("v3", 3)] for r in replicas)

    restarted = Replica()
    asyncio.run(transport.restore(restarted))
    assert restarted.loaded == [("v3", 3)]
    with pytest.raises(EngineError, match="folder transport: policy version 4 was not prepared"):
        asyncio.run(transport.push(4, replicas))
    transport.close()
    assert not transport.root.exists()


def test_adapter_transport_keeps_the_previous_version_and_names_each_served_one(tmp_path):
    served = []
    transport = AdapterTransport(Policy(), root=tmp_path / "adapters", dtype="float32", on_served=served.append)
    replica = Replica()

    asyncio.run(transport.restore(replica))
    assert replica.loaded == []
    sync(transport, 1, [replica])
    assert versions_on_disk(transport.root) == ["v1"]
    for version in (2, 3):
        sync(transport, version, [replica])
        assert versions_on_disk(transport.root) == [f"v{version - 1}", f"v{version}"]
    assert served == ["policy-lora-v1", "policy-lora-v2", "policy-lora-v3"]

    restarted = Replica()
    asyncio.run(transport.restore(restarted))
    assert restarted.loaded == [("v3", 3)]
    with pytest.raises(EngineError, match="policy version 5 was not prepared"):
        asyncio.run(transport.push(5, [replica]))


def test_a_version_prepared_again_replaces_its_leftovers(tmp_path):
    """An attempt that failed after exporting leaves a staged folder; preparing the version again starts clean."""
    policy = Policy()
    transport = FolderTransport(policy, root=tmp_path / "weights", dtype="float32")
    asyncio.run(transport.prepare(1))
    sync(transport, 1, [Replica()])
    assert (transport.folder(1) / "model-00000.safetensors").read_text() == "2"
    assert versions_on_disk(transport.root) == ["v1"]
