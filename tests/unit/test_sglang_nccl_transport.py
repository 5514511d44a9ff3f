"""SGLang's distributed transport's logic: bucket requests, what the sender broadcasts per bucket, call order, timeouts.

The broadcast into a live SGLang-CPU server over gloo is in tests/integration/test_sglang.py.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.nccl import NcclSender, build_manifest, chunk_layout
from atropos_verl.serving.transports.sglang_nccl import SGLangNcclTransport, bucket_requests, group_backend


def params():
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(16, 4, generator=generator)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 4, generator=generator)),
        ("model.layers.0.self_attn.k_proj.weight", torch.randn(4, 4, generator=generator)),
        ("model.norm.weight", torch.randn(4, generator=generator)),
        ("lm_head.weight", torch.randn(16, 4, generator=generator)),
    ]


def manifest_of(tensors, dtype="bfloat16", tied=True):
    return build_manifest(((n, t.dtype, t.shape) for n, t in tensors), dtype, tied)


def test_bucket_requests_follow_the_chunks_and_label_only_the_last():
    manifest = manifest_of(params())
    bodies = bucket_requests(manifest, 40, "g1", version=3, flush_cache=True)
    assert [b["names"] for b in bodies] == [[manifest.names[i] for i in c] for c in chunk_layout(manifest.sizes, 40)]
    assert len(bodies) > 1 and "lm_head.weight" not in sum((b["names"] for b in bodies), [])
    assert bodies[0]["dtypes"] == ["bfloat16"] and bodies[0]["shapes"] == [[16, 4]]
    assert {b["group_name"] for b in bodies} == {"g1"} and {b["load_format"] for b in bodies} == {"flattened_bucket"}
    assert [b["weight_version"] for b in bodies] == [None] * (len(bodies) - 1) + ["3"]
    assert [b["flush_cache"] for b in bodies] == [False] * (len(bodies) - 1) + [True]
    assert not bucket_requests(manifest, 40, "g1", version=3, flush_cache=False)[-1]["flush_cache"]
    assert group_backend("cuda") == "nccl" and group_backend("cpu") == "gloo"


class RecordingGroup:
    def __init__(self):
        self.sent = []

    def broadcast(self, tensor, src):
        assert src == 0
        self.sent.append(tensor.clone())


def test_each_broadcast_is_the_flattened_bucket_sglang_splits():
    """SGLang's FlattenedTensorBucket reads a bucket as its tensors' bytes back to back in the request's order."""
    manifest = manifest_of(params(), dtype="float32", tied=False)
    group = RecordingGroup()
    NcclSender(group, "cpu").send(iter(params()), manifest, 100)
    bodies = bucket_requests(manifest, 100, "g", version=1, flush_cache=True)
    assert len(group.sent) == len(bodies)
    tensors = dict(params())
    for flat, body in zip(group.sent, bodies):
        assert flat.dtype == torch.uint8
        offset = 0
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            numel = torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            got = flat[offset : offset + numel].view(getattr(torch, dtype)).view(shape)
            assert torch.equal(got, tensors[name]), name
            offset += numel
        assert offset == flat.numel()


class Policy:
    def __init__(self, log, send_delay=0.0):
        self.log, self.send_delay = log, send_delay

    def nccl_manifest(self, dtype):
        self.log.append("trainer: manifest")
        return dict(vars(manifest_of(params(), dtype)))

    def init_weights_sglang_group(self, master_address, master_port, world_size, backend, group_name, timeout_s):
        self.log.append(f"trainer: join {group_name} {master_address}:{master_port} world {world_size} {backend}")

    def send_weights_nccl(self, dtype, buffer_bytes):
        import time

        time.sleep(self.send_delay)
        self.log.append("trainer: broadcast")
        return {"chunks": 2.0}

    def release_weights_nccl(self):
        self.log.append("trainer: release")


class Replica:
    def __init__(self, name, log, tp=1, hang=None, flushes=True):
        self.name, self.log, self.tensor_parallel_size, self.hang = name, log, tp, hang
        self.flushes_cache, self.policy_version, self.buckets = flushes, 0, []

    async def _step(self, what):
        if self.hang and what.startswith(self.hang):
            await asyncio.sleep(30)
        self.log.append(f"{self.name}: {what}")

    async def init_weights_update_group(self, address, port, rank_offset, world_size, group_name, backend):
        await self._step(f"join {group_name} {address}:{port} offset {rank_offset} world {world_size} {backend}")

    async def update_weights_from_distributed(self, body, version, final):
        self.buckets.append(body)
        await self._step(f"bucket {len(body['names'])} final={final}")
        if final:
            self.policy_version = version

    async def destroy_weights_update_group(self, group_name):
        await self._step(f"destroy {group_name}")


def transport_for(policy, device="cpu", timeout_s=5.0):
    ports = itertools.count(29600)
    return SGLangNcclTransport(
        policy, dtype="bfloat16", device=device, ports=lambda: next(ports), buffer_bytes=40, timeout_s=timeout_s
    )


def test_push_forms_one_group_by_tp_ranks_then_sends_every_bucket_to_every_replica():
    log = []
    transport = transport_for(Policy(log), device="cuda")
    replicas = [Replica("sglang-0", log, tp=2), Replica("sglang-1", log, flushes=False)]
    buckets = len(chunk_layout(manifest_of(params()).sizes, 40))

    async def scenario():
        with pytest.raises(EngineError, match="not prepared"):
            await transport.push(1, replicas)
        await transport.prepare(1)
        await transport.push(1, replicas)
        first = list(log)
        log.clear()
        await transport.push(2, replicas)
        return first

    first = asyncio.run(scenario())
    assert set(first[1:4]) == {
        "trainer: join atropos_verl_weights_1 127.0.0.1:29600 world 4 nccl",
        "sglang-0: join atropos_verl_weights_1 127.0.0.1:29600 offset 1 world 4 nccl",
        "sglang-1: join atropos_verl_weights_1 127.0.0.1:29600 offset 3 world 4 nccl",
    }
    for replica in replicas:
        steps = [line for line in first if line.startswith(replica.name + ": bucket")]
        assert len(steps) == buckets and [line.endswith("final=True") for line in steps] == [False] * (buckets - 1) + [
            True
        ]
        assert replica.policy_version == 2
    # A replica paused with retract keeps its cache (a flush after retract kills SGLang 0.5.12).
    assert replicas[0].buckets[-1]["flush_cache"] and not replicas[1].buckets[-1]["flush_cache"]
    # The group is kept: the second sync is only the buckets and the broadcast.
    assert not [line for line in log if "join" in line] and "trainer: broadcast" in log
    assert transport.formations == 1 and transport.last_send["chunks"] == 2.0


def test_a_hung_replica_is_named_and_the_next_sync_forms_a_new_group():
    log = []
    transport = transport_for(Policy(log), timeout_s=0.3)
    healthy, hung = Replica("sglang-0", log), Replica("sglang-1", log, hang="bucket")

    async def scenario():
        await transport.prepare(1)
        with pytest.raises(
            EngineError, match=r"sglang-1: NCCL weight sync: /update_weights_from_distributed \(bucket 1 of \d+\) did"
        ):
            await transport.push(1, [healthy, hung])
        assert transport.broken
        hung.hang = None
        log.clear()
        await transport.push(1, [healthy, hung])

    asyncio.run(scenario())
    # The old group is left on both ends, the new one has its own name and port (gloo on CPU).
    assert log[:3] == ["trainer: release", "sglang-0: destroy atropos_verl_weights_1",
                       "sglang-1: destroy atropos_verl_weights_1"]  # fmt: skip
    assert "sglang-1: join atropos_verl_weights_2 127.0.0.1:29601 offset 2 world 3 gloo" in log
    assert transport.broken is None and hung.policy_version == 1


def test_a_replica_that_cannot_join_is_named():
    transport = transport_for(Policy([]), timeout_s=0.3)
    replica = Replica("sglang-0", [], hang="join")

    async def scenario():
        await transport.prepare(1)
        with pytest.raises(EngineError, match=r"sglang-0: NCCL weight sync: joining the weight-update group \(gloo\)"):
            await transport.push(1, [replica])

    asyncio.run(scenario())
    assert transport.formation is None


def test_a_refused_join_is_reported_not_the_trainer_waiting_for_it():
    policy = Policy([])
    transport = transport_for(policy, timeout_s=0.3)
    replica = Replica("sglang-0", [])

    def store_gives_up(*args):
        raise RuntimeError("TCPStore: timed out waiting for 2 workers")

    policy.init_weights_sglang_group = store_gives_up

    async def refuse(*args):
        raise EngineError("sglang-0: joining weight-update group failed: address in use")

    replica.init_weights_update_group = refuse

    async def scenario():
        await transport.prepare(1)
        with pytest.raises(EngineError, match="sglang-0: joining weight-update group failed"):
            await transport.push(1, [replica])

    asyncio.run(scenario())


def test_a_trainer_that_never_broadcasts_is_named():
    transport = transport_for(Policy([], send_delay=2), timeout_s=0.3)

    async def scenario():
        await transport.prepare(1)
        with pytest.raises(EngineError, match="the trainer: NCCL weight sync: the broadcast did not finish"):
            await transport.push(1, [Replica("sglang-0", [])])
        assert transport.broken

    asyncio.run(scenario())


class DevicePolicy:
    def __init__(self, device):
        self.device = device

    def release_weights_nccl(self):
        pass


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_service_gives_sglang_the_broadcast_transport_when_asked(device, backend, tmp_path):
    from atropos_verl.config import EngineConfig, ModelConfig
    from atropos_verl.placement import CPU_PLACEMENT, Placement
    from atropos_verl.serving.service import InferenceService

    engine = EngineConfig(kind="sglang", weight_transport="nccl", dtype="bfloat16", sync_bucket_mb=2)
    where = CPU_PLACEMENT if device == "cpu" else Placement(trainer_gpus=("0",), replica_gpus=(("1",),))
    service = InferenceService(engine, ModelConfig(), "/nonexistent", "bfloat16", tmp_path, where)
    transport = asyncio.run(service._make_transport(DevicePolicy(device)))  # type: ignore[arg-type]
    assert isinstance(transport, SGLangNcclTransport) and transport.name == "nccl"
    assert transport.backend == backend and transport.buffer_bytes == 2 << 20 and transport.dtype == "bfloat16"
    transport.close()
