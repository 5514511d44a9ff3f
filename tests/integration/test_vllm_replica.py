"""VLLMReplica against a real vLLM OpenAI server on the tiny random Llama.

One replica serves the whole module (start-up dominates the cost); the tests run in file
order and each leaves it serving the original weights, unpaused. The last test stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import live_replica
import pytest

from atropos_verl.serving.replicas import EngineError, ReplicaSpec, VLLMReplica

pytestmark = pytest.mark.integration

MODEL_NAME = "tiny"
START_TIMEOUT_S = 180.0
LOGPROB_ATOL = 1e-3
REPLICA_TOKEN = "replica-token-for-tests"


def _spec(model_path: str, **overrides: Any) -> ReplicaSpec:
    base: dict[str, Any] = {
        "model_path": model_path,
        "served_model_name": MODEL_NAME,
        "dtype": "float32",
        "max_model_len": 256,
        "gpu_memory_utilization": 0.4,
        # No hub here: a bad path must fail at once instead of retrying the network.
        "env": {"HF_HUB_OFFLINE": "1"},
    }
    base.update(overrides)
    return ReplicaSpec(**base)


class Live(live_replica.Live):
    replica: VLLMReplica

    async def completion(self, prompt_ids: list[int], **params: Any) -> dict[str, Any]:
        body = {"model": MODEL_NAME, "prompt": prompt_ids, **params}
        async with self.session.post(f"{self.replica.base_url}/v1/completions", json=body) as resp:
            payload: dict[str, Any] = await resp.json()
            assert resp.status == 200, payload
            return payload

    async def greedy(self, prompt_ids: list[int], max_tokens: int = 16) -> list[int]:
        payload = await self.completion(
            prompt_ids, max_tokens=max_tokens, temperature=0, logprobs=0, return_tokens_as_token_ids=True
        )
        return _token_ids(payload["choices"][0]["logprobs"]["tokens"])


def _token_ids(tokens: list[str]) -> list[int]:
    prefix = "token_id:"
    assert all(t.startswith(prefix) for t in tokens), tokens
    return [int(t[len(prefix) :]) for t in tokens]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: str) -> list[int]:
    return live_replica.prompt_ids_of(tiny_model)


@pytest.fixture(scope="module")
def live(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    replica = VLLMReplica(
        _spec(tiny_model, access_token=REPLICA_TOKEN), name="vllm-test", log_dir=tmp_path_factory.mktemp("vllm-logs")
    )
    yield from live_replica.serve_module(Live, replica, START_TIMEOUT_S, REPLICA_TOKEN, "vLLM")


def test_only_holders_of_the_replica_token_reach_the_server(live: Live) -> None:
    """Dev-mode control routes too: vLLM's own --api-key would leave /collective_rpc and /pause open."""

    routes = {
        "/health": ("GET", None),
        "/v1/models": ("GET", None),
        "/is_paused": ("GET", None),
        "/collective_rpc": ("POST", {"method": "get_model_config"}),
    }

    def statuses(token: str | None) -> dict[str, int]:
        return live.run(live_replica.route_statuses(live.replica.base_url, token, routes))

    assert statuses(None) == {"/health": 200, "/v1/models": 401, "/is_paused": 401, "/collective_rpc": 401}
    assert statuses("wrong")["/is_paused"] == 401
    assert statuses(REPLICA_TOKEN)["/is_paused"] == 200
    # The token reaches the server in its environment, never on its command line.
    assert REPLICA_TOKEN.encode() not in Path(f"/proc/{live.replica.pid}/cmdline").read_bytes()


@pytest.fixture(scope="module")
def perturbed_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return live_replica.save_perturbed(tiny_model, tmp_path_factory.mktemp("perturbed"))


def _served_logprobs(live: Live, prompt_ids: list[int]) -> list[float]:
    entries = live.run(live.replica.prompt_logprobs(prompt_ids))
    assert len(entries) == len(prompt_ids) and entries[0] is None
    return [entry for entry in entries[1:] if entry is not None]


def _assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    worst = max(abs(g - w) for g, w in zip(got, want))
    assert worst <= LOGPROB_ATOL, f"max |vLLM - transformers| logprob difference {worst:.2e}"
    print(f"\nmax |vLLM - transformers| prompt logprob difference: {worst:.1e}")


def test_start_health_and_token_completion(live: Live, prompt_ids: list[int]) -> None:
    replica = live.replica
    assert live.run(replica.health())
    assert replica.pid is not None and replica.base_url.startswith("http://127.0.0.1:")
    assert replica.policy_version == 0
    assert live.run(replica.weight_version()) == "0"

    payload = live.run(
        live.completion(prompt_ids, max_tokens=6, temperature=0, logprobs=0, return_tokens_as_token_ids=True)
    )
    logprobs = payload["choices"][0]["logprobs"]
    tokens = _token_ids(logprobs["tokens"])
    assert len(tokens) == 6 and len(logprobs["token_logprobs"]) == 6
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in logprobs["token_logprobs"])


def test_load_weights_swaps_and_restores(
    live: Live, tiny_model: str, perturbed_model: str, prompt_ids: list[int]
) -> None:
    replica = live.replica
    original_tokens = live.run(live.greedy(prompt_ids))
    _assert_close(_served_logprobs(live, prompt_ids), live_replica.hf_prompt_logprobs(tiny_model, prompt_ids))

    started = time.perf_counter()
    live.run(replica.load_weights(perturbed_model, version=1))
    load_s = time.perf_counter() - started
    assert replica.policy_version == 1 and live.run(replica.weight_version()) == "1"
    assert live.run(live.greedy(prompt_ids)) != original_tokens
    _assert_close(_served_logprobs(live, prompt_ids), live_replica.hf_prompt_logprobs(perturbed_model, prompt_ids))

    started = time.perf_counter()
    live.run(replica.load_weights(tiny_model, version=2))
    restore_s = time.perf_counter() - started
    assert replica.policy_version == 2 and live.run(replica.weight_version()) == "2"
    assert live.run(live.greedy(prompt_ids)) == original_tokens
    _assert_close(_served_logprobs(live, prompt_ids), live_replica.hf_prompt_logprobs(tiny_model, prompt_ids))
    print(f"\nload_weights: {load_s:.3f}s (perturbed), {restore_s:.3f}s (original)")


def test_load_weights_rejects_folder_without_safetensors(live: Live, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="vllm-test.*no \\*.safetensors"):
        live.run(live.replica.load_weights(str(tmp_path), version=99))
    assert live.replica.policy_version == 2


def test_request_sent_while_paused_completes_after_resume(live: Live, prompt_ids: list[int]) -> None:
    replica = live.replica

    async def timed_request() -> tuple[list[int], float]:
        tokens = await live.greedy(prompt_ids, max_tokens=8)
        return tokens, time.monotonic()

    live.run(replica.pause())
    try:
        assert live.run(replica.is_paused())
        task = live.loop.create_task(timed_request())
        live.run(asyncio.sleep(1.5))
        assert not task.done(), "a request was served while the replica was paused"
    finally:
        resumed_at = time.monotonic()
        live.run(replica.resume())
    tokens, answered_at = live.run(task, timeout_s=30)
    assert len(tokens) == 8
    assert answered_at > resumed_at
    print(f"\nrequest sent while paused answered {answered_at - resumed_at:.2f}s after resume")
    assert not live.run(replica.is_paused())


async def _read_event(stream: aiohttp.StreamReader, timeout_s: float) -> dict[str, Any] | None:
    """The next SSE data payload; None for the closing ``[DONE]``; TimeoutError when none comes."""
    while True:
        line = (await asyncio.wait_for(stream.readline(), timeout_s)).strip()
        if not line:
            continue
        data = line.decode().removeprefix("data: ")
        return None if data == "[DONE]" else json.loads(data)


def _event_tokens(event: dict[str, Any]) -> int:
    logprobs = event["choices"][0]["logprobs"]
    return len(logprobs["tokens"]) if logprobs else 0


def test_in_flight_request_survives_pause_load_resume(live: Live, tiny_model: str, prompt_ids: list[int]) -> None:
    """The trainer's sync step: an in-flight generation is held, not aborted, across a weight load."""
    replica = live.replica
    max_tokens = 200

    async def scenario() -> tuple[int, int, str | None, float, float]:
        body = {
            "model": MODEL_NAME,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "stream": True,
        }
        async with live.session.post(f"{replica.base_url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            first = await _read_event(resp.content, 30)
            assert first is not None
            await replica.pause()
            # Tokens generated before the pause took effect may still be in the pipe.
            before = _event_tokens(first)
            for _ in range(max_tokens):
                try:
                    event = await _read_event(resp.content, 1.0)
                except asyncio.TimeoutError:
                    break
                assert event is not None, "the stream finished while paused"
                before += _event_tokens(event)
            await replica.load_weights(tiny_model, version=3)
            with pytest.raises(asyncio.TimeoutError):
                await _read_event(resp.content, 1.0)
            resumed_at = time.monotonic()
            await replica.resume()
            after, finish_reason, last_at = 0, None, resumed_at
            while (event := await _read_event(resp.content, 30)) is not None:
                after += _event_tokens(event)
                finish_reason = event["choices"][0]["finish_reason"] or finish_reason
                last_at = time.monotonic()
            return before, after, finish_reason, resumed_at, last_at

    before, after, finish_reason, resumed_at, last_at = live.run(scenario(), timeout_s=120)
    print(f"\nin-flight request: {before} tokens before the pause, {after} after resume")
    assert finish_reason == "length"
    assert before < max_tokens and after > 0 and last_at > resumed_at
    assert before + after == max_tokens
    assert replica.policy_version == 3


def test_sleep_is_refused_without_sleep_mode(live: Live) -> None:
    with pytest.raises(EngineError, match="vllm-test.*sleep mode is off"):
        live.run(live.replica.sleep(1))
    with pytest.raises(EngineError, match="sleep mode is off"):
        live.run(live.replica.wake_up())
    assert live.run(live.replica.health())


@pytest.mark.skipif(_cuda_available(), reason="vLLM supports sleep mode on CUDA; this checks the CPU refusal")
def test_sleep_mode_is_refused_by_cpu_vllm(tiny_model: str) -> None:
    replica = VLLMReplica(_spec(tiny_model, enable_sleep_mode=True), name="vllm-sleepy")
    with pytest.raises(EngineError, match="(?s)vllm-sleepy.*Sleep mode is not supported on current platform"):
        asyncio.run(replica.start(timeout_s=90))
    assert replica.pid is None


def test_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    timeout_s = 90.0
    replica = VLLMReplica(_spec(str(tmp_path / "no-such-model")), name="vllm-broken", log_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        asyncio.run(replica.start(timeout_s=timeout_s))
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "vllm-broken" in message and "http://127.0.0.1:" in message
    assert "during start-up" in message and "no-such-model" in message
    assert f"last lines of {tmp_path / 'vllm-broken.log'}" in message
    assert elapsed < timeout_s
    assert replica.pid is None
    print(f"\nstart failure reported in {elapsed:.1f}s")


def test_stop_kills_process_group_and_frees_port(live: Live) -> None:
    replica = live.replica
    pid = replica.pid
    url = replica.base_url
    assert pid is not None and live_replica.port_accepts(url)
    live.run(replica.stop(), timeout_s=40)
    assert replica.pid is None
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not live_replica.port_accepts(url)
    assert not live.run(replica.health())
    live.run(replica.stop())
    with pytest.raises(EngineError, match="not started"):
        live.run(replica.pause())
