"""SGLangReplica and the gateway against a live SGLang 0.5.12 server on CPU (the tiny random Llama).

SGLang runs in its own venv (`make sglang-cpu`; ATROPOS_VERL_SGLANG_PYTHON names its python).
One replica, started with a replica token, serves the whole module (start-up dominates the
cost); the tests run in file order and each leaves it serving, unpaused. The last one stops it.
The atroposlib clients talk only to the gateway, as an environment would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import live_replica
import pytest
from atropos_clients import ENV_MODEL_NAME, atropos_client, managed_chat_nodes
from atroposlib.envs.server_handling.sglang_server import SGLangServer
from atroposlib.envs.server_handling.vllm_server import VLLMServer

from atropos_verl.modelinfo import ties_word_embeddings
from atropos_verl.serving.gateway import POLICY_VERSION_HEADER, Gateway
from atropos_verl.serving.lineage import PolicyLineage
from atropos_verl.serving.replicas import EngineError, ReplicaSpec, SGLangReplica
from atropos_verl.serving.replicas.access import TOKEN_HEADER
from atropos_verl.serving.transports.nccl import NcclSender, build_manifest
from atropos_verl.serving.transports.sglang_nccl import SGLangNcclTransport, UpdateGroup
from atropos_verl.serving.transports.sglang_tensor import TensorStage

pytestmark = [pytest.mark.integration, pytest.mark.sglang]

MODEL_NAME = "tiny"
START_TIMEOUT_S = 240.0
LOGPROB_ATOL = 1e-3
REPLICA_TOKEN = "sglang-replica-token-for-tests"


class Live(live_replica.Live):
    replica: SGLangReplica

    async def generate(self, prompt_ids: list[int], **sampling: Any) -> dict[str, Any]:
        body = {"input_ids": prompt_ids, "sampling_params": sampling, "return_logprob": True}
        async with self.session.post(f"{self.replica.base_url}/generate", json=body) as resp:
            payload: dict[str, Any] = await resp.json()
            assert resp.status == 200, payload
            return payload

    async def greedy(self, prompt_ids: list[int], max_tokens: int = 16) -> list[int]:
        return list((await self.generate(prompt_ids, max_new_tokens=max_tokens, temperature=0))["output_ids"])


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: str) -> list[int]:
    return live_replica.prompt_ids_of(tiny_model)


@pytest.fixture(scope="module")
def live(tiny_model: str, sglang_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    spec = ReplicaSpec(
        model_path=tiny_model,
        served_model_name=MODEL_NAME,
        dtype="float32",
        max_model_len=512,
        access_token=REPLICA_TOKEN,
        env={"HF_HUB_OFFLINE": "1"},
    )
    logs = tmp_path_factory.mktemp("sglang-logs")
    replica = SGLangReplica(spec, name="sglang-test", log_dir=logs, python=sglang_python)
    yield from live_replica.serve_module(Live, replica, START_TIMEOUT_S, REPLICA_TOKEN, "SGLang")


def test_only_holders_of_the_replica_token_reach_the_server(live: Live) -> None:
    routes = {
        "/health": ("GET", None),
        "/v1/models": ("GET", None),
        "/model_info": ("GET", None),
        "/pause_generation": ("POST", {"mode": "abort"}),
    }

    def statuses(token: str | None) -> dict[str, int]:
        return live.run(live_replica.route_statuses(live.replica.base_url, token, routes))

    refused = {"/health": 200, "/v1/models": 401, "/model_info": 401, "/pause_generation": 401}
    assert statuses(None) == refused
    assert statuses("wrong") == refused
    assert statuses(REPLICA_TOKEN)["/model_info"] == 200
    live.run(live.replica.resume())
    # The token reaches the server in its environment, never its command line or its log
    # (SGLang logs its server args, an --api-key among them).
    assert REPLICA_TOKEN.encode() not in Path(f"/proc/{live.replica.pid}/cmdline").read_bytes()
    assert live.replica.log_path is not None and REPLICA_TOKEN not in live.replica.log_path.read_text()


def test_start_health_and_generation(live: Live, prompt_ids: list[int]) -> None:
    replica = live.replica
    assert live.run(replica.health())
    assert replica.pid is not None and replica.base_url.startswith("http://127.0.0.1:")
    assert replica.policy_version == 0 and live.run(replica.weight_version()) == "0"
    payload = live.run(live.generate(prompt_ids, max_new_tokens=6, temperature=0, ignore_eos=True))
    pairs = payload["meta_info"]["output_token_logprobs"]
    assert [tid for _, tid, _ in pairs] == payload["output_ids"] and len(pairs) == 6
    assert all(isinstance(lp, float) and lp <= 0.0 for lp, _, _ in pairs)
    log = live.replica.log_path.read_text()
    assert "torch_native" in log


@pytest.fixture(scope="module")
def perturbed_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return live_replica.save_perturbed(tiny_model, tmp_path_factory.mktemp("perturbed"))


def _assert_served(live: Live, prompt_ids: list[int], model_dir: str) -> None:
    entries = live.run(live.replica.prompt_logprobs(prompt_ids))
    assert len(entries) == len(prompt_ids) and entries[0] is None
    want = live_replica.hf_prompt_logprobs(model_dir, prompt_ids)
    worst = max(abs(g - w) for g, w in zip(entries[1:], want))  # type: ignore[operator]
    assert worst <= LOGPROB_ATOL, f"max |SGLang - transformers| logprob difference {worst:.2e}"


async def _model_ids(live: Live) -> list[str]:
    async with live.session.get(f"{live.replica.base_url}/v1/models") as resp:
        return [model["id"] for model in (await resp.json())["data"]]


def test_load_weights_swaps_restores_and_keeps_the_served_name(
    live: Live, tiny_model: str, perturbed_model: str, prompt_ids: list[int]
) -> None:
    replica = live.replica
    original = live.run(live.greedy(prompt_ids))
    _assert_served(live, prompt_ids, tiny_model)

    live.run(replica.pause())
    live.run(replica.load_weights(perturbed_model, version=1))
    live.run(replica.resume())
    assert replica.policy_version == 1 and live.run(replica.weight_version()) == "1"
    # SGLang itself would rename the model to the weights folder here.
    assert live.run(_model_ids(live)) == [MODEL_NAME]
    assert live.run(live.greedy(prompt_ids)) != original
    _assert_served(live, prompt_ids, perturbed_model)

    live.run(replica.load_weights(tiny_model, version=2))
    assert replica.policy_version == 2 and live.run(replica.weight_version()) == "2"
    assert live.run(live.greedy(prompt_ids)) == original
    _assert_served(live, prompt_ids, tiny_model)
    print(f"\nload_weights (disk): {replica.last_load_seconds:.3f}s")


def test_load_weights_rejects_folder_without_safetensors(live: Live, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="sglang-test.*no \\*.safetensors"):
        live.run(live.replica.load_weights(str(tmp_path), version=99))
    assert live.replica.policy_version == 2


def test_request_sent_while_paused_completes_after_resume(live: Live, prompt_ids: list[int]) -> None:
    replica = live.replica

    async def timed_request() -> tuple[list[int], float]:
        tokens = await live.greedy(prompt_ids, max_tokens=8)
        return tokens, time.monotonic()

    live.run(replica.pause())
    try:
        task = live.loop.create_task(timed_request())
        live.run(asyncio.sleep(1.5))
        assert not task.done(), "a request was served while the replica was paused"
        # /health answers while paused (it runs no generation).
        assert live.run(replica.health())
    finally:
        resumed_at = time.monotonic()
        live.run(replica.resume())
    tokens, answered_at = live.run(task, timeout_s=30)
    assert len(tokens) == 8 and answered_at > resumed_at


def test_sync_with_a_request_in_flight_leaves_the_scheduler_alive(
    live: Live, tiny_model: str, prompt_ids: list[int]
) -> None:
    """The sync's path when the gateway's drain times out: pause, load with a flush, resume."""
    replica = live.replica

    async def scenario() -> dict[str, Any]:
        # An idle CPU decodes 400 tiny-model tokens in well under a second: pause as soon as a
        # request is seen in flight, and start another if one finished first.
        for _ in range(5):
            long_request = asyncio.create_task(
                live.generate(prompt_ids, max_new_tokens=400, temperature=0, ignore_eos=True)
            )
            await asyncio.sleep(0.1)
            if not long_request.done():
                break
            await long_request
        else:
            pytest.fail("no 400-token request stayed in flight for 0.1 s in 5 tries")
        await replica.pause()
        await replica.load_weights(tiny_model, version=3)
        await replica.resume()
        return await long_request

    answer = live.run(scenario(), timeout_s=120)
    # Aborted (not left half-computed under the old weights), and the server serves on.
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert live.run(replica.health())
    assert len(live.run(live.greedy(prompt_ids, max_tokens=4))) == 4
    assert replica.policy_version == 3 and live.run(replica.weight_version()) == "3"


def _hf_weights(model_dir: str) -> tuple[list[tuple[str, Any]], bool]:
    """The model's tensors by HF name, as the trainer's workers hand them over, and whether it ties its embeddings."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return list(model.state_dict().items()), ties_word_embeddings(model.config)


def test_load_weights_tensors_from_shared_memory_buckets(
    live: Live, tiny_model: str, perturbed_model: str, prompt_ids: list[int]
) -> None:
    """SGLang's /update_weights_from_tensor on CPU: two versions through the same file_system shared-memory buckets."""
    replica = live.replica
    stage = TensorStage()
    pointers: list[int] = []
    try:
        for version, model_dir in [(4, perturbed_model), (5, tiny_model)]:
            tensors, tied = _hf_weights(model_dir)
            staged = stage.stage(
                iter(tensors), bucket_bytes=1 << 20, dtype="float32", device="cpu", writer=True,
                tied_embeddings=tied, payloads=1,
            )  # fmt: skip
            assert staged["buckets"] > 1 and all(buffer.is_shared() for buffer in stage.buffers)
            pointers = pointers or [buffer.data_ptr() for buffer in stage.buffers]
            assert [buffer.data_ptr() for buffer in stage.buffers] == pointers
            live.run(replica.pause())
            live.run(replica.load_weights_tensors(staged["payloads"], version))
            live.run(replica.resume())
            assert replica.policy_version == version and live.run(replica.weight_version()) == str(version)
            # Version 3 served the tiny model: matching the perturbed one proves the load.
            _assert_served(live, prompt_ids, model_dir)
            mib, buckets = staged["bytes"] / 2**20, staged["buckets"]
            print(
                f"\nload_weights_tensors (shared memory, {mib:.1f} MiB in {buckets:.0f} buckets): "
                f"stage {staged['seconds']:.3f}s, load {replica.last_load_seconds:.3f}s"
            )
        with pytest.raises(EngineError, match="sglang-test.*2 tensor payloads for 1 TP ranks"):
            live.run(replica.load_weights_tensors(stage.payloads(2), version=6))
    finally:
        stage.release()
    assert replica.policy_version == 5 and live.run(replica.health())


class _TrainerRank0:
    """The trainer's rank-0 end in this process, as PolicyWorker runs it: the model's tensors by HF name."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, Any]] = []
        self.tied = False
        self.manifest: Any = None
        self.group: UpdateGroup | None = None
        self.sender: NcclSender | None = None

    def nccl_manifest(self, dtype: str) -> dict[str, Any]:
        self.manifest = build_manifest(((n, t.dtype, t.shape) for n, t in self.tensors), dtype, self.tied)
        return dict(vars(self.manifest))

    def init_weights_sglang_group(
        self, master_address: str, master_port: int, world_size: int, backend: str, group_name: str, timeout_s: float
    ) -> None:
        self.group = UpdateGroup.join(
            master_address, master_port, world_size, backend=backend, group_name=group_name, timeout_s=timeout_s
        )
        self.sender = NcclSender(self.group, "cpu")

    def send_weights_nccl(self, dtype: str, buffer_bytes: int) -> dict[str, float]:
        assert self.sender is not None
        return self.sender.send(iter(self.tensors), self.manifest, buffer_bytes)

    def release_weights_nccl(self) -> None:
        group, self.group, self.sender = self.group, None, None
        if group is not None:
            group.destroy()


def test_load_weights_by_gloo_broadcast_from_the_trainer(
    live: Live, tiny_model: str, perturbed_model: str, prompt_ids: list[int]
) -> None:
    """SGLang's /update_weights_from_distributed on CPU: the NCCL path's code with gloo, two versions, one group."""
    replica = live.replica
    trainer = _TrainerRank0()
    transport = SGLangNcclTransport(trainer, dtype="float32", device="cpu", buffer_bytes=1 << 20, timeout_s=60)
    try:
        for version, model_dir in [(6, perturbed_model), (7, tiny_model)]:
            trainer.tensors, trainer.tied = _hf_weights(model_dir)
            transport.manifest = None
            stats = live.run(transport.prepare(version))
            live.run(replica.pause())
            live.run(transport.push(version, [replica]))
            live.run(replica.resume())
            assert transport.formations == 1 and transport.last_send["chunks"] > 1
            assert replica.policy_version == version and live.run(replica.weight_version()) == str(version)
            # The previous version served the other model: matching this one proves the broadcast.
            _assert_served(live, prompt_ids, model_dir)
            print(
                f"\nnccl transport on gloo ({stats.bytes / 2**20:.1f} MiB in {transport.last_send['chunks']:.0f} "
                f"buckets): push {transport.last_send['push_seconds']:.3f}s"
            )
    finally:
        live.run(transport._leave())
    assert live.run(replica.health())


def test_sleep_is_refused_without_the_memory_saver(live: Live) -> None:
    with pytest.raises(EngineError, match="sglang-test.*enable_sleep_mode"):
        live.run(live.replica.sleep())
    assert live.run(live.replica.health())


# --- the gateway in front of the live replica --------------------------------------------


@contextlib.asynccontextmanager
async def running_gateway(live: Live, **kwargs: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(
        [live.replica.base_url],
        model_name=MODEL_NAME,
        backend_headers={TOKEN_HEADER: REPLICA_TOKEN},
        backend_engine="sglang",
        max_model_len=512,
        **kwargs,
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def test_atroposlib_sglang_client_through_the_gateway(live: Live, tiny_model: str, prompt_ids: list[int]) -> None:
    async def scenario() -> None:
        async with running_gateway(live) as gateway:
            async with atropos_client(SGLangServer, gateway, tiny_model, "sglang") as server:
                _, outputs, logprobs, finish = await server.tokens_and_logprobs_completion(
                    prompt=live_replica.PROMPT, n=2, max_tokens=5, temperature=1.0
                )
                assert len(outputs) == len(logprobs) == len(finish) == 2
                for ids, lps, reason in zip(outputs, logprobs, finish):
                    assert 1 <= len(ids) <= 5 and len(lps) == len(ids) and all(lp <= 0.0 for lp in lps)
                    assert reason["type"] in ("length", "stop")

                _, [greedy_ids], [greedy_lps], _ = await server.tokens_and_logprobs_completion(
                    input_ids=prompt_ids, max_tokens=5, temperature=0.0
                )
                direct = await live.generate(prompt_ids, max_new_tokens=5, temperature=0.0)
                assert greedy_ids == direct["output_ids"]
                assert greedy_lps == [lp for lp, _, _ in direct["meta_info"]["output_token_logprobs"]]

            # The gateway stamps its policy version; the OpenAI routes pass through to SGLang.
            gateway.resume(7)
            async with aiohttp.ClientSession() as session:
                body = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 2}, "rid": "r-1"}
                async with session.post(f"{gateway.url}/generate", json=body) as resp:
                    answer = await resp.json()
                    assert resp.status == 200 and resp.headers[POLICY_VERSION_HEADER] == "7"
                assert answer["policy_version"] == 7 and answer["meta_info"]["weight_version"] == "7"
                assert answer["meta_info"]["id"] == "r-1"
                vllm_body = {"prompt": {"prompt_token_ids": prompt_ids}, "max_tokens": 2, "prompt_logprobs": 1}
                async with session.post(f"{gateway.url}/generate", json=vllm_body) as resp:
                    refusal = await resp.json()
                    assert resp.status == 400 and "prompt_logprobs" in refusal["error"]["message"]
                completion = {"model": ENV_MODEL_NAME, "prompt": live_replica.PROMPT, "max_tokens": 3, "temperature": 0}
                async with session.post(f"{gateway.url}/v1/completions", json=completion) as resp:
                    payload = await resp.json()
                    assert resp.status == 200, payload
                assert payload["model"] == MODEL_NAME and payload["choices"][0]["text"]

    live.run(scenario(), timeout_s=120)


def test_lineage_records_what_generate_returned_on_sglang(live: Live, prompt_ids: list[int]) -> None:
    """The trainer reads each group's staleness from the gateway's lineage: SGLang's /generate answers,
    native and translated from the vLLM format, are recorded with the version that served them."""
    lineage = PolicyLineage(capacity=100)

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        async with running_gateway(live, lineage=lineage) as gateway, aiohttp.ClientSession() as session:
            gateway.resume(3)
            native = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 4, "temperature": 1.0, "n": 2}}
            async with session.post(f"{gateway.url}/generate", json=native) as resp:
                assert resp.status == 200
                answers = await resp.json()
            gateway.resume(4)
            vllm_format = {"prompt": {"prompt_token_ids": prompt_ids}, "max_tokens": 4, "temperature": 0.0}
            async with session.post(f"{gateway.url}/generate", json=vllm_format) as resp:
                assert resp.status == 200
                translated = await resp.json()
        return [a["output_ids"] for a in answers], translated["token_ids"]

    sampled, greedy = live.run(scenario(), timeout_s=120)
    assert len(sampled) == 2 and len(greedy) == 1
    assert all(lineage.run_version(ids) == 3 for ids in sampled if ids not in greedy)
    assert lineage.run_version(greedy[0]) == 4


def test_atroposlib_vllm_client_is_translated_for_sglang(live: Live, tiny_model: str, prompt_ids: list[int]) -> None:
    """Data configs default to server_type vllm: the gateway turns that format into SGLang's and back."""

    async def scenario() -> None:
        async with running_gateway(live) as gateway:
            async with atropos_client(VLLMServer, gateway, tiny_model, "vllm") as server:
                _, outputs, logprobs, finish = await server.tokens_and_logprobs_completion(
                    prompt=live_replica.PROMPT, n=2, max_tokens=5, temperature=1.0
                )
                assert len(outputs) == len(logprobs) == len(finish) == 2
                for ids, lps in zip(outputs, logprobs):
                    assert 1 <= len(ids) <= 5 and len(lps) == len(ids) and all(lp <= 0.0 for lp in lps)
                assert all(reason in ("length", "stop") for reason in finish)
                _, [greedy_ids], [greedy_lps], [reason] = await server.tokens_and_logprobs_completion(
                    input_ids=prompt_ids, max_tokens=5, temperature=0.0
                )
        direct = await live.generate(prompt_ids, max_new_tokens=5, temperature=0.0)
        assert greedy_ids == direct["output_ids"]
        assert greedy_lps == [lp for lp, _, _ in direct["meta_info"]["output_token_logprobs"]]
        assert reason == direct["meta_info"]["finish_reason"]["type"]

    live.run(scenario(), timeout_s=120)


@pytest.mark.parametrize("server_type", ["sglang", "vllm"])
def test_managed_server_chat_through_the_gateway(live: Live, tiny_model: str, server_type: str) -> None:
    """The path most environments take: ServerManager -> ManagedServer -> /generate."""

    async def scenario() -> None:
        async with running_gateway(live) as gateway:
            await managed_chat_nodes(gateway, tiny_model, server_type)

    live.run(scenario(), timeout_s=120)


def test_stop_kills_the_process_group_and_frees_the_port(live: Live) -> None:
    replica = live.replica
    pid, url = replica.pid, replica.base_url
    assert pid is not None and live_replica.port_accepts(url)
    live.run(replica.stop(), timeout_s=40)
    assert replica.pid is None and not Path(f"/proc/{pid}").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not live_replica.port_accepts(url)
    with pytest.raises(EngineError, match="not started"):
        live.run(replica.pause())
