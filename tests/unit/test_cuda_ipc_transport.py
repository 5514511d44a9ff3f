"""Pure logic of the CUDA IPC transport: bucket packing, payloads, tied lm_head, selection, timeouts."""

from __future__ import annotations

import asyncio
import base64
import pickle

import pytest

from atropos_verl.config import EngineConfig
from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.replicas.base import ReplicaSpec
from atropos_verl.serving.replicas.vllm import VLLMReplica
from atropos_verl.serving.service import build_replicas
from atropos_verl.serving.transports.cuda_ipc import (
    BucketPacker,
    CudaIpcTransport,
    pack_into_buckets,
    select_transport,
    skips,
    update_info,
)


def test_packer_places_back_to_back_and_opens_buckets():
    packer = BucketPacker(100)
    placed = [packer.place(n, [s // 2], "bfloat16", s, 2) for n, s in [("a", 40), ("b", 60), ("c", 10), ("d", 300)]]
    assert placed == [(0, 0), (0, 40), (1, 0), (2, 0)]
    # A tensor larger than a bucket gets a bucket of its own size.
    assert [b.capacity for b in packer.buckets] == [100, 100, 300]
    assert packer.buckets[0].names == ["a", "b"] and packer.buckets[0].used == 100


def test_packer_never_misaligns_a_tensor():
    packer = BucketPacker(100)
    packer.place("odd", [3], "uint8", 3, 1)
    # Offset 3 cannot hold a 2-byte element: vLLM splits by sizes without padding, so a new bucket.
    assert packer.place("half", [4], "bfloat16", 8, 2) == (1, 0)


def test_packer_reuses_earlier_capacities():
    packer = BucketPacker(100, capacities=[100, 300])
    packer.place("a", [50], "bfloat16", 100, 2)
    packer.place("b", [100], "bfloat16", 200, 2)
    assert [b.capacity for b in packer.buckets] == [100, 300]


def test_packing_casts_into_reused_buckets_and_drops_the_spare_ones():
    """The packing both GPU stages (vLLM IPC, SGLang tensors) and SGLang's CPU stage share, on CPU buffers."""
    import torch

    allocated = []

    def allocate(capacity):
        allocated.append(capacity)
        return torch.empty(capacity, dtype=torch.uint8)

    named = [
        ("model.embed_tokens.weight", torch.randn(4, 8)),
        ("model.norm.weight", torch.randn(8)),
        ("step", torch.tensor([3, 4], dtype=torch.int64)),
        ("lm_head.weight", torch.randn(4, 8)),
    ]
    kw = dict(bucket_bytes=64, dtype="bfloat16", writer=True, tied_embeddings=True)
    buffers = []
    packer, views = pack_into_buckets(named, buffers, allocate, **kw)

    assert [name for name, _ in views] == ["model.embed_tokens.weight", "model.norm.weight", "step"]
    assert allocated == [64, 64] and len(buffers) == 2
    for (_, view), (_, tensor) in zip(views, named):
        # Floats in the engine's dtype, integers as they are; the view lies inside a bucket.
        assert view.dtype == (torch.bfloat16 if tensor.is_floating_point() else torch.int64)
        assert torch.equal(view, tensor.to(view.dtype))
        assert any(view.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b in buffers)
    assert [b.names for b in packer.buckets] == [["model.embed_tokens.weight"], ["model.norm.weight", "step"]]

    # The next version reuses the same buckets (no allocation); one fewer tensor drops the spare bucket.
    first = buffers[0]
    named[0] = ("model.embed_tokens.weight", torch.randn(4, 8))
    pack_into_buckets(named[:1], buffers, allocate, **kw)
    assert allocated == [64, 64] and len(buffers) == 1 and buffers[0] is first
    assert torch.equal(buffers[0][:64].view(torch.bfloat16).view(4, 8), named[0][1].to(torch.bfloat16))

    # Ranks other than the writer walk the tensors (the all-gathers) and copy nothing.
    assert pack_into_buckets(named, [], allocate, **{**kw, "writer": False})[1] == []


def test_tied_lm_head_is_skipped_only_when_tied():
    assert skips("lm_head.weight", tied_embeddings=True)
    assert not skips("lm_head.weight", tied_embeddings=False)
    assert not skips("model.embed_tokens.weight", tied_embeddings=True)


def test_update_info_is_vllm_packed_http_form():
    packer = BucketPacker(64)
    packer.place("model.layers.0.self_attn.q_proj.weight", [2, 4], "bfloat16", 16, 2)
    packer.place("model.norm.weight", [4], "bfloat16", 8, 2)
    info = update_info(packer.buckets[0], "GPU-1234", ("args", 0))
    assert info["names"] == ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    assert info["shapes"] == [[2, 4], [4]] and info["tensor_sizes"] == [16, 8]
    assert info["dtype_names"] == ["bfloat16", "bfloat16"] and info["packed"] is True
    assert pickle.loads(base64.b64decode(info["ipc_handles_pickled"])) == {"GPU-1234": ("args", 0)}


def test_selection():
    same = {"vllm-0": ["GPU-a"]}
    kw = dict(engine_kind="vllm", trainer_gpu="GPU-a")
    assert select_transport("auto", device="cuda", replica_gpus=same, **kw) == "cuda_ipc"
    assert select_transport("folder", device="cuda", replica_gpus=same, **kw) == "folder"
    assert select_transport("auto", device="cpu", replica_gpus={}, **kw) == "shared_memory"
    other = {"vllm-0": ["GPU-a"], "vllm-1": ["GPU-b"]}
    assert select_transport("auto", device="cuda", replica_gpus=other, **kw) == "folder"
    with pytest.raises(EngineError, match="vllm-1"):
        select_transport("cuda_ipc", device="cuda", replica_gpus=other, **kw)
    # SGLang: the same choices (its /update_weights_from_tensor payloads), by the placement's GPU names.
    sglang = dict(engine_kind="sglang", trainer_gpu="0")
    assert select_transport("auto", device="cuda", replica_gpus={"sglang-0": ["0"]}, **sglang) == "cuda_ipc"
    assert select_transport("cuda_ipc", device="cuda", replica_gpus={"sglang-0": ["0"]}, **sglang) == "cuda_ipc"
    assert select_transport("auto", device="cuda", replica_gpus={"sglang-0": ["1"]}, **sglang) == "folder"
    # A replica on another Ray node has no GPU the trainer shares.
    with pytest.raises(EngineError, match="sglang-0 runs on GPU\\(s\\) \\[\\]"):
        select_transport("cuda_ipc", device="cuda", replica_gpus={"sglang-0": []}, **sglang)
    # SGLang's broadcast route takes the backend: nccl on CUDA, gloo on a CPU trainer; vLLM's needs CUDA.
    assert select_transport("nccl", device="cuda", replica_gpus={"sglang-0": ["1"]}, **sglang) == "nccl"
    assert select_transport("nccl", device="cpu", replica_gpus={}, **sglang) == "nccl"
    with pytest.raises(
        EngineError, match="nccl needs a CUDA trainer \\(or SGLang.*trainer.device=cpu, engine.kind=vllm"
    ):
        select_transport("nccl", device="cpu", replica_gpus={}, engine_kind="vllm", trainer_gpu=None)


def test_config_field_and_replica_launch():
    assert EngineConfig().weight_transport == "auto"
    cfg = EngineConfig(kind="vllm", weight_transport="bogus")
    with pytest.raises(Exception, match="weight_transport"):
        cfg.validate()
    for setting, expected in [("auto", "ipc"), ("cuda_ipc", "ipc"), ("folder", "folder")]:
        engine = EngineConfig(kind="vllm", weight_transport=setting, dtype="bfloat16")
        from atropos_verl.config import ModelConfig

        (replica,) = build_replicas(
            engine,
            ModelConfig(),
            "/nonexistent",
            "bfloat16",
            log_dir=None,
            access_token="t",  # type: ignore[arg-type]
        )
        assert replica._spec.weight_transfer == expected
        # Replicas the service starts answer only the run's token.
        assert replica._spec.access_token == "t" and "--middleware" in replica.command(1)
    ipc = VLLMReplica(ReplicaSpec(model_path="m", served_model_name="m", weight_transfer="ipc"))
    # The worker extension opens the buckets itself: vLLM's own unpickling stays refused, its transfer engine off.
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in ipc.environment()
    assert "--weight-transfer-config" not in ipc.command(1)


class FakePolicy:
    def __init__(self):
        self.released = 0

    def stage_weights_ipc(self, bucket_bytes, dtype):
        return {"updates": [{"names": ["x"]}], "bytes": 2.0, "seconds": 0.0}

    def release_weights_ipc(self):
        self.released += 1


class SlowReplica:
    name = "vllm-7"
    policy_version = 0

    def __init__(self, delay):
        self.delay = delay
        self.loaded = []

    async def load_weights_ipc(self, updates, version):
        await asyncio.sleep(self.delay)
        self.loaded.append((version, updates))
        self.policy_version = version


def test_push_restore_and_timeout_names_the_replica():
    async def scenario():
        policy = FakePolicy()
        transport = CudaIpcTransport(policy, dtype="bfloat16", timeout_s=0.05)
        with pytest.raises(EngineError, match="not prepared"):
            await transport.push(1, [SlowReplica(0)])
        assert (await transport.prepare(1)).bytes == 2.0
        fast = SlowReplica(0)
        await transport.push(1, [fast])
        assert fast.loaded == [(1, [{"names": ["x"]}])]
        restarted = SlowReplica(0)
        await transport.restore(restarted)
        assert restarted.policy_version == 1
        await transport.prepare(2)
        with pytest.raises(EngineError, match=r"vllm-7: CUDA IPC weight sync of policy version 2 did not finish"):
            await transport.push(2, [SlowReplica(1.0)])
        transport.close()
        assert policy.released == 1

    asyncio.run(scenario())
