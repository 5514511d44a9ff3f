"""The NCCL transport's logic on CPU: chunk layout, a real gloo broadcast of the packed chunks, call order, timeouts.

The vLLM side of the broadcast is reproduced here from vLLM 0.24's packed consumer rule
(chunk boundaries derived from the manifest alone); the GPU run is the multi-GPU issue's.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.nccl import (
    PACKED_NUM_BUFFERS,
    Manifest,
    NcclSender,
    NcclTransport,
    build_manifest,
    chunk_layout,
    rank_offsets,
    update_info,
)


def params(scale: float = 1.0):
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", scale * torch.randn(16, 4, generator=generator)),
        ("model.layers.0.self_attn.q_proj.weight", scale * torch.randn(4, 4, generator=generator)),
        ("model.layers.0.self_attn.k_proj.weight", scale * torch.randn(4, 4, generator=generator)),
        ("model.norm.weight", scale * torch.randn(4, generator=generator)),
        ("lm_head.weight", scale * torch.randn(16, 4, generator=generator)),
    ]


def manifest_of(tensors, dtype="float32", tied=True) -> Manifest:
    return build_manifest(((n, t.dtype, t.shape) for n, t in tensors), dtype, tied)


def test_chunks_close_once_the_total_exceeds_the_buffer():
    assert chunk_layout([40, 60, 10, 300, 5], 100) == [[0, 1, 2], [3], [4]]
    # Exactly the buffer size does not close a chunk (vLLM's consumer uses ">").
    assert chunk_layout([50, 50, 1], 100) == [[0, 1, 2]]
    assert chunk_layout([], 100) == []
    with pytest.raises(ValueError):
        chunk_layout([1], 0)


def test_rank_offsets_follow_the_trainer():
    assert rank_offsets([1, 2, 1]) == ([1, 2, 4], 5)
    with pytest.raises(ValueError):
        rank_offsets([0])


def test_manifest_casts_and_skips_the_tied_head():
    manifest = manifest_of(params(), dtype="bfloat16")
    assert manifest.names == [n for n, _ in params()][:4]
    assert set(manifest.dtype_names) == {"bfloat16"}
    assert manifest.sizes == [t.numel() * 2 for _, t in params()[:4]]
    assert manifest_of(params(), tied=False).names[-1] == "lm_head.weight"
    info = update_info(manifest, 128)
    assert info["packed"] is True and info["packed_buffer_size_bytes"] == 128
    assert info["packed_num_buffers"] == PACKED_NUM_BUFFERS and info["shapes"][0] == [16, 4]


class RecordingGroup:
    def __init__(self):
        self.chunks = []

    def broadcast(self, tensor, src):
        assert src == 0
        self.chunks.append(tensor.clone())


def consume(manifest: Manifest, chunks, buffer_bytes):
    """What vLLM's worker makes of the chunks, knowing only the manifest (0.24's consumer rule)."""
    received, chunk_iter = {}, iter(chunks)
    for indices in chunk_layout(manifest.sizes, buffer_bytes):
        data = next(chunk_iter)
        assert data.numel() == sum(manifest.sizes[i] for i in indices)
        for index, part in zip(indices, data.split([manifest.sizes[i] for i in indices])):
            dtype = getattr(torch, manifest.dtype_names[index])
            received[manifest.names[index]] = part.view(dtype).view(manifest.shapes[index])
    assert next(chunk_iter, None) is None
    return received


@pytest.mark.parametrize("buffer_bytes", [1, 100, 300, 1 << 20])
def test_sender_packs_what_the_consumer_unpacks(buffer_bytes):
    manifest = manifest_of(params())
    group = RecordingGroup()
    out = NcclSender(group, "cpu").send(iter(params()), manifest, buffer_bytes)
    assert out["chunks"] == len(group.chunks) == len(chunk_layout(manifest.sizes, buffer_bytes))
    received = consume(manifest, group.chunks, buffer_bytes)
    assert all(torch.equal(received[n], t) for n, t in params()[:4])


def test_sender_refuses_an_order_the_replicas_would_misread():
    manifest = manifest_of(params())
    swapped = [params()[1], params()[0]] + params()[2:]
    with pytest.raises(EngineError, match="q_proj.weight comes at position 0"):
        NcclSender(RecordingGroup(), "cpu").send(iter(swapped), manifest, 100)
    with pytest.raises(EngineError, match="no parameter model.norm.weight"):
        NcclSender(RecordingGroup(), "cpu").send(iter(params()[:3]), manifest, 100)


class GlooGroup:
    def broadcast(self, tensor, src):
        dist.broadcast(tensor, src=src)


def _gloo_rank(rank: int, port: int, buffer_bytes: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        manifest = manifest_of(params(3.0), dtype="bfloat16")
        if rank == 0:
            NcclSender(GlooGroup(), "cpu").send(iter(params(3.0)), manifest, buffer_bytes)
            return
        chunks = []
        for indices in chunk_layout(manifest.sizes, buffer_bytes):
            chunk = torch.empty(sum(manifest.sizes[i] for i in indices), dtype=torch.uint8)
            dist.broadcast(chunk, src=0)
            chunks.append(chunk)
        received = consume(manifest, chunks, buffer_bytes)
        results.put({name: tensor.float().tolist() for name, tensor in received.items()})
    finally:
        dist.destroy_process_group()


def test_a_real_gloo_broadcast_arrives_intact():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=_gloo_rank, args=(rank, port, 100, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    received = results.get(timeout=120)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for name, tensor in params(3.0)[:4]:
        assert torch.equal(torch.tensor(received[name]), tensor.to(torch.bfloat16).float()), name


class Policy:
    def __init__(self, log, send_delay=0.0):
        self.log, self.send_delay = log, send_delay

    def nccl_manifest(self, dtype):
        self.log.append("trainer: manifest")
        return dict(vars(manifest_of(params(), dtype)))

    def init_weights_nccl(self, master_address, master_port, world_size):
        self.log.append(f"trainer: join {master_address}:{master_port} world {world_size}")

    def send_weights_nccl(self, dtype, buffer_bytes):
        import time

        time.sleep(self.send_delay)
        self.log.append("trainer: broadcast")
        return {"seconds": self.send_delay}

    def release_weights_nccl(self):
        self.log.append("trainer: release")


class Replica:
    def __init__(self, name, log, world_size=1, hang=None):
        self.name, self.log, self.world, self.hang, self.policy_version = name, log, world_size, hang, 0

    async def _step(self, what):
        if self.hang == what:
            await asyncio.sleep(30)
        self.log.append(f"{self.name}: {what}")

    async def weight_transfer_world_size(self):
        return self.world

    async def init_weight_transfer(self, init_info):
        await self._step(f"join offset {init_info['rank_offset']} world {init_info['world_size']}")

    async def start_weight_update(self):
        await self._step("start")

    async def update_weights(self, info):
        await self._step("update")

    async def finish_weight_update(self, version):
        await self._step("finish")
        self.policy_version = version


def test_push_orders_the_calls_and_forms_one_group_for_all_replicas():
    log = []
    transport = NcclTransport(Policy(log), dtype="bfloat16", master_port=29555, buffer_bytes=128, timeout_s=5)
    replicas = [Replica("a", log, world_size=2), Replica("b", log)]

    async def scenario():
        with pytest.raises(EngineError, match="not prepared"):
            await transport.push(1, replicas)
        await transport.prepare(1)
        await transport.push(1, replicas)
        first = list(log)
        log.clear()
        await transport.prepare(2)
        await transport.push(2, replicas)
        return first

    first = asyncio.run(scenario())
    assert first[0] == "trainer: manifest"
    assert set(first[1:4]) == {"trainer: join 127.0.0.1:29555 world 4", "a: join offset 1 world 4",
                               "b: join offset 3 world 4"}  # fmt: skip
    assert first[4:] == ["a: start", "b: start", "a: update", "b: update", "trainer: broadcast", "a: finish",
                         "b: finish"]  # fmt: skip
    # The group and manifest are kept: later syncs are start, broadcast + update, finish.
    assert log == ["a: start", "b: start", "a: update", "b: update", "trainer: broadcast", "a: finish", "b: finish"]
    assert [r.policy_version for r in replicas] == [2, 2]


def test_a_hung_replica_is_named_and_the_group_is_rebuilt():
    log = []
    transport = NcclTransport(Policy(log), dtype="float32", master_port=1, timeout_s=0.3)
    healthy, hung = Replica("vllm-0", log), Replica("vllm-1", log, hang="update")

    async def scenario():
        await transport.prepare(1)
        with pytest.raises(EngineError, match=r"vllm-1: NCCL weight sync: /update_weights did not finish within 0.3s"):
            await transport.push(1, [healthy, hung])
        assert transport.broken and "vllm-1" in transport.broken
        hung.hang = None
        log.clear()
        await transport.push(1, [healthy, hung])

    asyncio.run(scenario())
    assert log[0] == "trainer: release" and "vllm-1: join offset 2 world 3" in log


def test_a_trainer_that_never_broadcasts_is_named():
    transport = NcclTransport(Policy([], send_delay=2), dtype="float32", master_port=1, timeout_s=0.3)

    async def scenario():
        await transport.prepare(1)
        replica = Replica("vllm-0", [])
        replica.update_weights = lambda info: asyncio.sleep(0)
        with pytest.raises(EngineError, match="the trainer: NCCL weight sync: the broadcast did not finish"):
            await transport.push(1, [replica])

    asyncio.run(scenario())


def test_restore_after_a_sync_is_refused_with_the_replica_named():
    log = []
    transport = NcclTransport(Policy(log), dtype="float32", master_port=1)

    async def scenario():
        replica = Replica("vllm-0", log)
        await transport.restore(replica)  # nothing pushed yet: it starts from the base weights, like the others
        await transport.prepare(1)
        await transport.push(1, [replica])
        with pytest.raises(EngineError, match="vllm-0: restarted"):
            await transport.restore(replica)

    asyncio.run(scenario())


def test_selection_and_replica_launch_for_nccl():
    from atropos_verl.config import EngineConfig
    from atropos_verl.serving.replicas.base import ReplicaSpec
    from atropos_verl.serving.replicas.vllm import VLLMReplica
    from atropos_verl.serving.service import replica_weight_transfer
    from atropos_verl.serving.transports.cuda_ipc import select_transport

    other = {"vllm-0": ["GPU-b"]}
    assert select_transport("nccl", device="cuda", engine_kind="vllm", trainer_gpu="GPU-a", replica_gpus=other) == (
        "nccl"
    )
    # Not picked by auto until it has run on GPUs: replicas on other GPUs get the folder.
    assert select_transport("auto", device="cuda", engine_kind="vllm", trainer_gpu="GPU-a", replica_gpus=other) == (
        "folder"
    )
    with pytest.raises(EngineError, match="trainer.device=cpu"):
        select_transport("nccl", device="cpu", engine_kind="vllm", trainer_gpu=None, replica_gpus={})
    assert replica_weight_transfer(EngineConfig(kind="vllm", weight_transport="nccl")) == "nccl"
    assert replica_weight_transfer(EngineConfig(kind="vllm", weight_transport="shared_memory")) == "folder"
    replica = VLLMReplica(ReplicaSpec(model_path="m", served_model_name="m", weight_transfer="nccl"))
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in replica.environment()


def test_a_failed_update_marks_the_group_broken():
    log = []
    transport = NcclTransport(Policy(log), dtype="float32", master_port=1, timeout_s=5)
    replica = Replica("vllm-0", log)

    async def refuse(info):
        raise EngineError("vllm-0: HTTP 500")

    async def scenario():
        await transport.prepare(1)
        await transport.push(1, [replica])
        assert transport.broken is None
        replica.update_weights = refuse
        with pytest.raises(EngineError, match="HTTP 500"):
            await transport.push(2, [replica])
        assert transport.broken

    asyncio.run(scenario())
