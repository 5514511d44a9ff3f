"""The gateway against a real vLLM OpenAI server and atroposlib's own server clients.

One vLLM process (the tiny random Llama, CPU) serves the whole module. The
atroposlib clients (`VLLMServer`, `SGLangServer`, `OpenAIServer`) talk only to the
gateway, exactly as an environment would; what they get back is checked against
what the same vLLM reports on its own /v1/completions. Routing and draining use
small aiohttp backends written here, whose delays the tests control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from atropos_clients import ENV_MODEL_NAME, atropos_client, managed_chat_nodes
from atroposlib.envs.server_handling.openai_server import OpenAIServer
from atroposlib.envs.server_handling.sglang_server import SGLangServer
from atroposlib.envs.server_handling.vllm_server import VLLMServer

from atropos_verl.netutil import free_port
from atropos_verl.procs import ChildFailed, ChildProcess, http_ok
from atropos_verl.serving.gateway import Gateway
from atropos_verl.serving.lineage import PolicyLineage

pytestmark = pytest.mark.integration

SERVED_NAME = "tiny-policy"  # what vLLM serves; the gateway's model_name
API_KEY = "test-key-4f1c9a"
PROMPT = "The capital of France is"
VLLM_READY_TIMEOUT_S = 240.0
SCENARIO_TIMEOUT_S = 120.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)

T = TypeVar("T")


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_url(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", tiny_model, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--served-model-name", SERVED_NAME, "--gpu-memory-utilization", "0.4",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    server = ChildProcess("vLLM", tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start(cmd, env=env)
    try:
        try:
            server.wait_ready(lambda: http_ok(f"{url}/health"), VLLM_READY_TIMEOUT_S, "GET /health")
        except ChildFailed as exc:
            pytest.fail(str(exc))
        yield url
    finally:
        server.stop(timeout_s=30)


def run(scenario: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = SCENARIO_TIMEOUT_S) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout_s)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def running_gateway(backends: list[str], **kwargs: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(backends, model_name=SERVED_NAME, **kwargs)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def post(url: str, body: dict[str, Any], key: str | None = API_KEY) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, dict(response.headers), await response.json(content_type=None)


async def get(url: str, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.get(url, headers=headers) as response:
            return response.status, dict(response.headers), await response.json(content_type=None)


async def direct_completion(vllm_url: str, **body: Any) -> dict[str, Any]:
    """The backend's own /v1/completions answer, the reference for what the gateway returns."""
    status, _, data = await post(
        f"{vllm_url}/v1/completions", {"model": SERVED_NAME, "return_token_ids": True, **body}, key=None
    )
    assert status == 200, data
    choice: dict[str, Any] = data["choices"][0]
    return choice


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def fake_backend(name: str) -> AsyncIterator[str]:
    """An OpenAI-ish backend that answers after body["delay"] seconds and says who it is."""

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(float(body.get("delay", 0)))
        return web.json_response({"backend": name, "model": body.get("model")})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# --- atroposlib's clients through the gateway, against real vLLM -------------------------


def test_vllm_client_tokens_logprobs_and_prompt_logprobs(vllm_url: str, tiny_model: str) -> None:
    async def scenario() -> None:
        async with running_gateway([vllm_url], api_key=API_KEY) as gateway:
            async with atropos_client(VLLMServer, gateway, tiny_model, "vllm", API_KEY) as server:
                prompt_ids, outputs, logprobs, finish = await server.tokens_and_logprobs_completion(
                    prompt=PROMPT, n=2, max_tokens=6, temperature=1.0
                )
                assert prompt_ids == server.tokenizer.encode(PROMPT)
                assert len(outputs) == len(logprobs) == len(finish) == 2
                for ids, lps, reason in zip(outputs, logprobs, finish):
                    assert 1 <= len(ids) <= 6 and len(lps) == len(ids)
                    assert all(isinstance(t, int) for t in ids) and all(lp <= 0.0 for lp in lps)
                    assert reason in ("length", "stop")

                # Greedy, so the backend asked directly must produce the same tokens and logprobs,
                # bit for bit: the prompt is shorter than a KV-cache block, so neither request
                # reuses the other's cache and both run the same computation.
                _, [greedy_ids], [greedy_lps], [greedy_finish] = await server.tokens_and_logprobs_completion(
                    input_ids=prompt_ids, max_tokens=6, temperature=0.0
                )
                reference = await direct_completion(
                    vllm_url, prompt=prompt_ids, max_tokens=6, temperature=0.0, logprobs=0
                )
                assert greedy_ids == reference["token_ids"]
                assert greedy_lps == reference["logprobs"]["token_logprobs"]
                assert greedy_finish == reference["finish_reason"]

                # atroposlib's prompt-logprob path (`_get_logprobs_wrapper`).
                payload = await server.get_logprobs(input_ids=prompt_ids, top_k=2)
                reference = await direct_completion(
                    vllm_url, prompt=prompt_ids, max_tokens=1, temperature=0.0, prompt_logprobs=2
                )
                assert payload["prompt_tokens"] == prompt_ids
                top_ids, top_lps = payload["prompt_topk_token_ids"], payload["prompt_topk_logprobs"]
                assert len(top_ids) == len(top_lps) == len(prompt_ids)
                assert top_ids[0] == [] and top_lps[0] == []  # the first token has no logprob
                for position in range(1, len(prompt_ids)):
                    expected = reference["prompt_logprobs"][position]
                    assert top_ids[position][0] == prompt_ids[position]  # the prompt's own token first
                    assert top_ids[position] == [int(k) for k in expected]
                    assert top_lps[position] == [v["logprob"] for v in expected.values()]

    run(scenario)


def test_sglang_client_through_translation(vllm_url: str, tiny_model: str) -> None:
    async def scenario() -> None:
        async with running_gateway([vllm_url], api_key=API_KEY) as gateway:
            async with atropos_client(SGLangServer, gateway, tiny_model, "sglang", API_KEY) as server:
                prompt_ids, outputs, logprobs, finish = await server.tokens_and_logprobs_completion(
                    prompt=PROMPT, n=2, max_tokens=5, temperature=1.0
                )
                assert len(outputs) == len(logprobs) == len(finish) == 2
                for ids, lps, reason in zip(outputs, logprobs, finish):
                    assert 1 <= len(ids) <= 5 and len(lps) == len(ids) and all(lp <= 0.0 for lp in lps)
                    # SGLang's finish_reason objects, which ManagedServer reads via ["type"].
                    assert reason == {"type": "length", "length": 5} or reason["type"] == "stop"

                # n == 1 comes back as SGLang's single object; the client handles both.
                _, [greedy_ids], [greedy_lps], [greedy_finish] = await server.tokens_and_logprobs_completion(
                    input_ids=prompt_ids, max_tokens=5, temperature=0.0
                )
                reference = await direct_completion(
                    vllm_url, prompt=prompt_ids, max_tokens=5, temperature=0.0, logprobs=0
                )
                assert greedy_ids == reference["token_ids"]
                assert greedy_lps == reference["logprobs"]["token_logprobs"]
                assert greedy_finish["type"] == ("length" if reference["finish_reason"] == "length" else "stop")

    run(scenario)


@pytest.mark.parametrize("server_type", ["vllm", "sglang"])
def test_managed_server_chat_through_gateway(vllm_url: str, tiny_model: str, server_type: str) -> None:
    """The path most environments take: ServerManager -> ManagedServer -> /generate."""

    async def scenario() -> None:
        async with running_gateway([vllm_url], api_key=API_KEY) as gateway:
            nodes = await managed_chat_nodes(gateway, tiny_model, server_type, API_KEY)
        for node in nodes:
            completion = [i for i, m in enumerate(node.masked_tokens) if m != -100]
            assert all(node.logprobs[i] == 1.0 for i in range(completion[0]))  # prompt positions
            assert node.metadata["finish_reason"] in ("length", "stop")

    run(scenario)


def test_openai_client_completion_chat_and_stream(vllm_url: str, tiny_model: str) -> None:
    async def scenario() -> None:
        async with running_gateway([vllm_url], api_key=API_KEY) as gateway:
            async with atropos_client(OpenAIServer, gateway, tiny_model, "openai", API_KEY) as server:
                completion = await server.completion(prompt=PROMPT, n=2, max_tokens=4)
                assert len(completion.choices) == 2
                # The env named the model by its hub id; the gateway mapped it to the served policy.
                assert completion.model == SERVED_NAME
                chat = await server.chat_completion(
                    messages=[{"role": "user", "content": "Say hi."}], n=2, max_tokens=4
                )
                assert len(chat.choices) == 2 and all(c.message.role == "assistant" for c in chat.choices)

            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
                async with session.post(
                    f"{gateway.url}/v1/chat/completions",
                    json={
                        "model": ENV_MODEL_NAME,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4,
                        "stream": True,
                    },
                    headers={"Authorization": f"Bearer {API_KEY}"},
                ) as response:
                    assert response.status == 200
                    assert response.headers["X-Policy-Version"] == "0"
                    assert response.headers["Content-Type"].startswith("text/event-stream")
                    events = [line for line in (await response.text()).splitlines() if line.startswith("data: ")]
            assert len(events) >= 3 and events[-1] == "data: [DONE]"
            assert gateway.in_flight == 0

    run(scenario)


def test_generate_wire_formats(vllm_url: str) -> None:
    """The exact /generate shapes, including what atroposlib's clients do not exercise."""

    async def scenario() -> None:
        async with running_gateway([vllm_url]) as gateway:
            url = f"{gateway.url}/generate"
            ids = [1, 2, 3, 4]
            status, headers, body = await post(
                url, {"prompt": {"prompt_token_ids": ids}, "logprobs": 2, "n": 2, "max_tokens": 3, "prompt_logprobs": 1}
            )
            assert status == 200 and headers["X-Policy-Version"] == "0" and body["policy_version"] == 0
            assert body["prompt_token_ids"] == ids and len(body["logprobs"]) == len(body["finish_reasons"]) == 2
            for token_ids, positions in zip(body["token_ids"], body["logprobs"]):
                for token_id, [entry] in zip(token_ids, positions):
                    # Sampled token first (what atroposlib reads), then the top 2.
                    assert next(iter(entry)) == str(token_id) and 2 <= len(entry) <= 3
            assert body["prompt_logprobs"][0] is None
            assert [next(iter(e)) for e in body["prompt_logprobs"][1:]] == [str(t) for t in ids[1:]]

            sglang = {"input_ids": ids, "return_logprob": True}
            status, headers, single = await post(url, {**sglang, "sampling_params": {"max_new_tokens": 3}})
            assert status == 200 and headers["X-Policy-Version"] == "0"
            assert set(single) == {"text", "output_ids", "meta_info", "policy_version"}
            meta = single["meta_info"]
            assert meta["finish_reason"] == {"type": "length", "length": 3}
            assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (4, 3, "0")
            assert [t for _, t, _ in meta["output_token_logprobs"]] == single["output_ids"]

            # Greedy n > 1: SGLang returns n identical samples; vLLM alone would refuse it.
            greedy = {"n": 3, "temperature": 0, "max_new_tokens": 2}
            status, _, many = await post(url, {**sglang, "sampling_params": greedy})
            assert status == 200 and len(many) == 3 and len({tuple(m["output_ids"]) for m in many}) == 1

            # A stop token ends the output as SGLang reports it: {"type": "stop", "matched": id}.
            first = many[0]["output_ids"][0]
            status, _, stopped = await post(
                url, {**sglang, "sampling_params": {"temperature": 0, "max_new_tokens": 5, "stop_token_ids": [first]}}
            )
            assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
            assert stopped["output_ids"] == [first]

            status, _, error = await post(url, {"input_ids": ids, "lora_path": "adapter"})
            assert status == 400 and "lora_path" in error["error"]["message"]
            status, _, error = await post(url, {"messages": []})
            assert status == 400 and error["error"]["type"] == "invalid_request"

            # Backend errors keep their status and vLLM's message.
            status, headers, error = await post(url, {"prompt": {"prompt_token_ids": ids}, "max_tokens": 5000})
            assert status == 400 and "max_model_len" in error["error"]["message"] and "X-Policy-Version" in headers
            status, _, error = await post(f"{gateway.url}/v1/completions", {"prompt": "hi", "max_tokens": 5000})
            assert status == 400 and "max_model_len" in error["error"]["message"]

    run(scenario)


# --- the weight-sync gate ----------------------------------------------------------------


def test_request_during_pause_waits_and_gets_new_version(vllm_url: str) -> None:
    async def scenario() -> None:
        async with running_gateway([vllm_url]) as gateway:
            assert await gateway.pause(drain_timeout_s=5.0)
            request = asyncio.create_task(
                post(f"{gateway.url}/generate", {"prompt": {"prompt_token_ids": [1, 2, 3]}, "max_tokens": 2})
            )
            await asyncio.sleep(0.5)
            assert not request.done()
            status, _, health = await get(f"{gateway.url}/health")
            assert status == 200 and health["paused"] is True and health["policy_version"] == 0

            gateway.resume(7)
            status, headers, body = await request
            assert status == 200 and headers["X-Policy-Version"] == "7" and body["policy_version"] == 7
            assert gateway.policy_version == 7

    run(scenario)


def test_pause_longer_than_max_wait_gives_503_with_reason(vllm_url: str) -> None:
    async def scenario() -> None:
        async with running_gateway([vllm_url], max_wait_s=0.3) as gateway:
            await gateway.pause(drain_timeout_s=1.0)
            started = time.monotonic()
            status, headers, body = await post(f"{gateway.url}/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert time.monotonic() - started >= 0.3
            assert status == 503 and headers["X-Policy-Version"] == "0"
            assert body["error"]["type"] == "weight_sync_in_progress"
            assert "weight sync" in body["error"]["message"] and "max_wait_s" in body["error"]["message"]

        # No backends at all (a replica restart): requests wait for set_backends, then run.
        async with running_gateway([], max_wait_s=10.0) as gateway:
            assert (await get(f"{gateway.url}/health"))[0] == 503
            request = asyncio.create_task(post(f"{gateway.url}/v1/completions", {"prompt": "hi", "max_tokens": 2}))
            await asyncio.sleep(0.3)
            assert not request.done()
            gateway.set_backends([vllm_url])
            status, _, body = await request
            assert status == 200 and body["model"] == SERVED_NAME

    run(scenario)


def test_pause_drains_in_flight_requests(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with fake_backend("a") as backend, running_gateway([backend]) as gateway:
            url = f"{gateway.url}/v1/completions"
            slow = asyncio.create_task(post(url, {"delay": 0.8}))
            await wait_until(lambda: gateway.in_flight == 1)
            started = time.monotonic()
            assert await gateway.pause(drain_timeout_s=10.0) is True
            # It returned only once the backend had answered the slow request.
            assert time.monotonic() - started >= 0.5 and gateway.in_flight == 0
            status, headers, _ = await slow
            assert status == 200 and headers["X-Policy-Version"] == "0"

            gateway.resume(1)
            slower = asyncio.create_task(post(url, {"delay": 1.5}))
            await wait_until(lambda: gateway.in_flight == 1)
            with caplog.at_level(logging.WARNING, logger="atropos_verl.serving.gateway"):
                assert await gateway.pause(drain_timeout_s=0.2) is False
            assert "1 requests still in flight" in caplog.text
            gateway.resume(2)
            status, headers, _ = await slower
            # Labelled with the version it was admitted under.
            assert status == 200 and headers["X-Policy-Version"] == "1"

    run(scenario)


# --- routing and failover ----------------------------------------------------------------


def test_least_in_flight_routing_with_round_robin_ties() -> None:
    async def scenario() -> None:
        async with fake_backend("a") as a, fake_backend("b") as b, running_gateway([a, b]) as gateway:
            url = f"{gateway.url}/v1/completions"

            async def served_by(delay: float = 0.0) -> str:
                status, _, body = await post(url, {"delay": delay})
                assert status == 200 and body["model"] == SERVED_NAME
                return str(body["backend"])

            slow = asyncio.create_task(served_by(1.0))
            await wait_until(lambda: gateway.in_flight == 1)
            quick = [await served_by() for _ in range(4)]
            busy = await slow
            assert len(set(quick)) == 1 and quick[0] != busy  # all went to the idle one

            assert sorted([await served_by() for _ in range(4)]) == ["a", "a", "b", "b"]  # ties alternate
            assert sorted(await asyncio.gather(*(served_by(0.3) for _ in range(4)))) == ["a", "a", "b", "b"]

    run(scenario)


def test_refused_backend_fails_over_then_502(vllm_url: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused

    async def scenario() -> None:
        async with running_gateway([dead, vllm_url]) as gateway:
            for _ in range(4):
                status, _, body = await post(
                    f"{gateway.url}/generate", {"prompt": {"prompt_token_ids": [1, 2, 3]}, "max_tokens": 2}
                )
                assert status == 200 and len(body["token_ids"][0]) == 2
            # The first request went to the dead one (a tie, first in order) and failed over;
            # the cool-down kept the other three off it.
            assert caplog.text.count(f"backend {dead} failed") == 1

        async with running_gateway([dead]) as gateway:
            status, headers, body = await post(f"{gateway.url}/v1/completions", {"prompt": "hi"})
            assert status == 502 and headers["X-Policy-Version"] == "0"
            assert body["error"]["type"] == "backend_unreachable" and dead in body["error"]["message"]

    with caplog.at_level(logging.WARNING, logger="atropos_verl.serving.gateway"):
        run(scenario)


# --- auth and lifecycle ------------------------------------------------------------------


def test_bearer_token_required_except_health(vllm_url: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_gateway([vllm_url], api_key=API_KEY) as gateway:
            assert (await get(f"{gateway.url}/health"))[0] == 200
            assert (await get(f"{gateway.url}/v1/models"))[0] == 401
            assert (await get(f"{gateway.url}/v1/models", key="wrong"))[0] == 401
            status, _, models = await get(f"{gateway.url}/v1/models", key=API_KEY)
            assert status == 200 and [m["id"] for m in models["data"]] == [SERVED_NAME]
            body = {"prompt": {"prompt_token_ids": [1, 2]}, "max_tokens": 1}
            status, headers, error = await post(f"{gateway.url}/generate", body, key=None)
            assert status == 401 and error["error"]["type"] == "unauthorized" and "X-Policy-Version" in headers
            assert (await post(f"{gateway.url}/generate", body))[0] == 200

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert API_KEY not in caplog.text


def test_stop_frees_the_port(vllm_url: str) -> None:
    port = free_port()

    async def scenario() -> None:
        async with running_gateway([vllm_url], port=port) as gateway:
            assert gateway.url == f"http://127.0.0.1:{port}"
            assert (await get(f"{gateway.url}/health"))[0] == 200
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(f"http://127.0.0.1:{port}/health")
        # A restarted gateway can take the same address at once.
        async with running_gateway([vllm_url], port=port) as gateway:
            assert (await get(f"{gateway.url}/health"))[0] == 200

    run(scenario)


def test_lineage_records_what_each_route_returned_with_its_version(vllm_url: str) -> None:
    """Completions from every non-streamed route are found again by their token ids, under the serving version."""
    lineage = PolicyLineage(capacity=100)

    async def post(session: aiohttp.ClientSession, gateway: Gateway, path: str, body: dict) -> dict:
        async with session.post(
            f"{gateway.url}{path}",
            json={"model": ENV_MODEL_NAME, **body},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def scenario() -> None:
        async with running_gateway([vllm_url], api_key=API_KEY, lineage=lineage) as gateway:
            gateway.resume(5)
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
                plain = await post(session, gateway, "/v1/completions", {"prompt": PROMPT, "n": 2, "max_tokens": 4})
                # The gateway asked for the ids; the caller did not, so its answer has none.
                assert all(choice.get("token_ids") is None for choice in plain["choices"])
                assert len(lineage) == 2
                asked = await post(
                    session, gateway, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "return_token_ids": True}
                )
                chat = await post(
                    session,
                    gateway,
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "return_token_ids": True},
                )
                gateway.resume(6)
                native = await post(
                    session, gateway, "/generate", {"prompt": {"prompt_token_ids": [1, 2, 3]}, "max_tokens": 4}
                )
        assert lineage.run_version(asked["choices"][0]["token_ids"]) == 5
        assert lineage.run_version(chat["choices"][0]["token_ids"]) == 5
        assert lineage.run_version(native["token_ids"][0]) == 6
        assert len(lineage) == 5

    run(scenario)
