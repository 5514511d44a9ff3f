"""The shared-memory transport's trainer end on a real /dev/shm file, its layout checks, selection and timeouts."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
import torch

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.cuda_ipc import select_transport
from atropos_verl.serving.transports.shared_memory import (
    ALIGNMENT,
    SharedMemoryFile,
    SharedMemoryStage,
    SharedMemoryTransport,
    default_path,
    layout_entries,
    read_views,
)


def params(scale: float = 1.0):
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", scale * torch.randn(33, 5, generator=generator)),
        ("model.layers.0.self_attn.q_proj.weight", scale * torch.randn(5, 5, generator=generator)),
        ("model.norm.weight", scale * torch.randn(3, generator=generator)),
        ("lm_head.weight", scale * torch.randn(33, 5, generator=generator)),
    ]


@pytest.fixture
def stage():
    staged = SharedMemoryStage()
    yield staged
    staged.release()


def read_back(layout):
    file = SharedMemoryFile(layout["path"], create=False)
    file.remap(layout["size"])
    try:
        return {name: view.clone() for name, view in read_views(layout, file)}
    finally:
        file.close()


def test_stage_writes_engine_dtype_skips_tied_head_and_is_private(stage):
    path = str(default_path())
    out = stage.stage(iter(params()), path=path, dtype="bfloat16", writer=True, tied_embeddings=True)
    layout = out["layout"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [t["name"] for t in layout["tensors"]] == [n for n, _ in params()][:3]
    assert all(t["offset"] % ALIGNMENT == 0 for t in layout["tensors"])
    loaded = read_back(layout)
    for name, tensor in params()[:3]:
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16))
    assert out["bytes"] == sum(t.numel() * 2 for _, t in params()[:3])
    stage.release()
    assert not os.path.exists(path)


def test_untied_head_is_sent_and_float32_stays_exact(stage):
    out = stage.stage(iter(params()), path=str(default_path()), dtype="float32", writer=True, tied_embeddings=False)
    loaded = read_back(out["layout"])
    assert set(loaded) == {n for n, _ in params()}
    assert all(torch.equal(loaded[n], t) for n, t in params())


def test_later_versions_reuse_the_file_and_overwrite_it(stage):
    path = str(default_path())
    first = stage.stage(iter(params()), path=path, dtype="float32", writer=True, tied_embeddings=True)
    inode = os.stat(path).st_ino
    second = stage.stage(iter(params(2.0)), path=path, dtype="float32", writer=True, tied_embeddings=True)
    assert os.stat(path).st_ino == inode and second["layout"]["size"] == first["layout"]["size"]
    assert torch.equal(read_back(second["layout"])["model.norm.weight"], params(2.0)[2][1])


def test_the_file_grows_for_a_larger_model(stage):
    path = str(default_path())
    stage.stage(iter(params()), path=path, dtype="float32", writer=True, tied_embeddings=True)
    big = [("model.embed_tokens.weight", torch.ones(40 << 20, dtype=torch.uint8))] + params()[1:]
    out = stage.stage(iter(big), path=path, dtype="float32", writer=True, tied_embeddings=True)
    assert out["layout"]["size"] >= 40 << 20
    # Grown by doubling, then cut back: the file holds the weights and no spare tmpfs pages.
    last = out["layout"]["tensors"][-1]
    assert os.stat(path).st_size == out["layout"]["size"] == last["offset"] + last["bytes"]
    assert torch.equal(read_back(out["layout"])["model.norm.weight"], params()[2][1])


def test_other_ranks_walk_without_a_file(stage):
    walked = []

    def tensors():
        for item in params():
            walked.append(item[0])
            yield item

    out = stage.stage(tensors(), path=str(default_path()), dtype="float32", writer=False, tied_embeddings=True)
    assert out["layout"] is None and stage.file is None and len(walked) == 4


def test_layout_outside_the_file_is_refused():
    layout = {"path": "x", "size": 128, "tensors": [{"name": "w", "dtype": "float32", "shape": [64], "offset": 0}]}
    layout["tensors"][0]["bytes"] = 256
    with pytest.raises(ValueError, match="w: bytes"):
        layout_entries(layout)
    layout["tensors"][0].update(bytes=4, offset=4)
    with pytest.raises(ValueError, match="misaligned"):
        layout_entries(layout)


def test_selection_picks_shared_memory_on_cpu():
    kw = dict(trainer_gpu=None, replica_gpus={})
    assert select_transport("auto", device="cpu", engine_kind="vllm", **kw) == "shared_memory"
    assert select_transport("shared_memory", device="cpu", engine_kind="vllm", **kw) == "shared_memory"
    assert select_transport("folder", device="cpu", engine_kind="vllm", **kw) == "folder"
    # For SGLang the same medium carries its /update_weights_from_tensor payloads.
    assert select_transport("auto", device="cpu", engine_kind="sglang", **kw) == "shared_memory"
    assert select_transport("shared_memory", device="cpu", engine_kind="sglang", **kw) == "shared_memory"
    assert select_transport("folder", device="cpu", engine_kind="sglang", **kw) == "folder"
    with pytest.raises(EngineError, match="vllm or sglang"):
        select_transport("shared_memory", device="cpu", engine_kind="external", **kw)
    with pytest.raises(EngineError, match="runs on cuda"):
        select_transport("shared_memory", device="cuda", engine_kind="vllm", trainer_gpu="a", replica_gpus={})


class Policy:
    def __init__(self, stage: SharedMemoryStage):
        self.stage = stage
        self.released = 0

    def stage_weights_shm(self, path, dtype):
        return self.stage.stage(iter(params()), path=path, dtype=dtype, writer=True, tied_embeddings=True)

    def release_weights_shm(self):
        self.released += 1
        raise RuntimeError("workers already gone")


class Replica:
    def __init__(self, name, delay=0.0):
        self.name, self.delay, self.policy_version, self.loads = name, delay, 0, []

    async def load_weights_shm(self, layout, version, layerwise=False):
        await asyncio.sleep(self.delay)
        self.loads.append((version, read_back(layout)["model.norm.weight"]))
        self.policy_version = version


def test_transport_push_restore_timeout_and_close(stage):
    policy = Policy(stage)
    transport = SharedMemoryTransport(policy, dtype="float32", timeout_s=0.2)

    async def scenario():
        with pytest.raises(EngineError, match="version 1 was not prepared"):
            await transport.push(1, [Replica("a")])
        stats = await transport.prepare(1)
        assert stats.bytes > 0
        fast, slow = Replica("fast"), Replica("slow", delay=5)
        await transport.push(1, [fast])
        assert fast.policy_version == 1 and torch.equal(fast.loads[0][1], params()[2][1])
        restarted = Replica("fast")
        await transport.restore(restarted)
        assert restarted.policy_version == 1
        await transport.prepare(2)
        with pytest.raises(EngineError, match="slow: shared-memory weight sync of policy version 2 did not finish"):
            await transport.push(2, [slow])

    asyncio.run(scenario())
    path = transport.path
    assert path.exists()
    transport.close()
    # The driver removes the file even when the workers cannot be reached any more.
    assert policy.released == 1 and not path.exists()
