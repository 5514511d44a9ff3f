"""AtroposClient and ApiServerProcess against a real atroposlib `run-api` (no mocks).

The environment side is played with plain aiohttp so the tests pin the wire
protocol, not our own client's idea of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from atropos_verl.atropos import (
    ApiServerProcess,
    AtroposAPIError,
    AtroposClient,
    TrainerRegistration,
    free_port,
)

pytestmark = pytest.mark.timeout(60)


def _registration(batch_size: int = 4, max_token_len: int = 64) -> TrainerRegistration:
    return TrainerRegistration(
        wandb_group="g",
        wandb_project="p",
        batch_size=batch_size,
        max_token_len=max_token_len,
        checkpoint_dir="/tmp/atropos-verl-test-ckpt",
        save_checkpoint_interval=10,
        starting_step=0,
        num_steps=100,
    )


def _client(url: str, batch_size: int = 4, **overrides: Any) -> AtroposClient:
    kwargs: dict[str, Any] = dict(
        request_timeout_s=5.0,
        connect_deadline_s=5.0,
        poll_interval_s=0.05,
        max_poll_interval_s=0.2,
        max_retries=2,
        retry_backoff_s=0.05,
    )
    kwargs.update(overrides)
    return AtroposClient(url, _registration(batch_size), **kwargs)


def _group(size: int = 2, env_id: int | None = None, first_token: int = 1) -> dict[str, Any]:
    tokens = [[first_token + i, 100 + i, 200 + i] for i in range(size)]
    group: dict[str, Any] = {
        "tokens": tokens,
        "masks": [[-100, t[1], t[2]] for t in tokens],
        "scores": [float(i % 2) for i in range(size)],
    }
    if env_id is not None:
        group["env_id"] = env_id
    return group


async def _env_call(url: str, method: str, path: str, body: Any = None, *, raw: str | None = None) -> Any:
    """The environment's side of the protocol, as BaseEnv does it: plain JSON over HTTP."""
    headers = None if raw is None else {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.request(method, url + path, json=body, data=raw, headers=headers) as resp,
    ):
        text = await resp.text()
        assert resp.status == 200, text
        return json.loads(text) if resp.content_type == "application/json" else text


_ENV_REGISTRATION = {"max_token_length": 64, "desired_name": "test_env", "weight": 1.0, "group_size": 2}


async def _register_env(url: str) -> int:
    answer = await _env_call(url, "POST", "/register-env", _ENV_REGISTRATION)
    assert answer["status"] == "success", answer
    env_id: int = answer["env_id"]
    return env_id


def _sequences(batch: list[dict[str, Any]]) -> int:
    return sum(len(group["tokens"]) for group in batch)


def test_wait_until_reachable_names_url_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        async with _client(url, connect_deadline_s=1.5) as client:
            started = time.monotonic()
            with pytest.raises(AtroposAPIError) as err:
                await client.wait_until_reachable()
            elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 3.0, elapsed
        assert url in str(err.value) and "unreachable after 1.5s" in str(err.value)
        assert err.value.url == url

    asyncio.run(scenario())


def test_register_then_env_posts_then_batch(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url) as client:
            assert (await client.wait_until_reachable()).current_step == 0
            assert isinstance(await client.register(), int)
            # Environments are told to wait until the trainer's first /batch call.
            early = await _env_call(url, "POST", "/register-env", _ENV_REGISTRATION)
            assert early == {"status": "wait for trainer to start"}
            assert await client.get_batch() is None
            env_id = await _register_env(url)
            for i in range(3):
                await _env_call(url, "POST", "/scored_data", _group(2, env_id, first_token=10 * i))
            batch = await client.next_batch(deadline_s=10)
            assert batch is not None and _sequences(batch) == 4 and len(batch) == 2
            assert all(group["env_id"] == env_id and group["masks"][0][0] == -100 for group in batch)
            status = await client.status()
            assert (status.current_step, status.queue_size) == (1, 1)
            assert client.batches_received == 1 and client.reregistrations == 0 and client.retries == 0

    asyncio.run(scenario())


def test_lockout_from_early_env_data_is_cleared_on_register(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        await _env_call(url, "POST", "/scored_data", _group(2))
        # The server now ignores /register and hides the queued group from /status.
        async with _client(url) as client:
            await client.register()
            assert (client.resets, client.reregistrations) == (1, 1)
            assert (await client.info())["batch_size"] == 4
            assert await client.get_batch() is None
            env_id = await _register_env(url)
            for _ in range(2):
                await _env_call(url, "POST", "/scored_data", _group(2, env_id))
            batch = await client.next_batch(deadline_s=10)
            assert batch is not None and _sequences(batch) == 4

    asyncio.run(scenario())


def test_get_batch_recovers_after_external_reset(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url) as client:
            await client.register()
            assert await client.get_batch() is None
            # A bare /reset_data makes the next /batch fail with HTTP 500 (its queue is deleted).
            assert await _env_call(url, "GET", "/reset_data") == "Reset successful"
            assert await client.get_batch() is None
            assert client.reregistrations == 1 and (await client.info())["batch_size"] == 4

    asyncio.run(scenario())


def test_get_batch_reregisters_after_api_restart(atropos_api: ApiServerProcess, tmp_path: Path) -> None:
    async def scenario(url: str) -> None:
        async with _client(url, max_retries=6) as client:
            await client.register()
            assert await client.get_batch() is None
            atropos_api.stop()
            with ApiServerProcess.start(port=atropos_api.port, log_path=tmp_path / "restarted.log") as restarted:
                assert restarted.url == url
                assert await client.get_batch() is None
                assert client.reregistrations == 1
                env_id = await _register_env(url)
                for _ in range(2):
                    await _env_call(url, "POST", "/scored_data", _group(2, env_id))
                batch = await client.next_batch(deadline_s=10)
                assert batch is not None and _sequences(batch) == 4

    asyncio.run(scenario(atropos_api.url))


def test_batch_size_mismatch_raises_or_resets(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url, batch_size=4) as first:
            await first.register()
        async with _client(url, batch_size=8) as second:
            with pytest.raises(AtroposAPIError) as err:
                await second.register()
        message = str(err.value)
        assert "batch_size=4" in message and "batch_size=8" in message
        assert "reset_on_mismatch" in message and url in message
        async with _client(url, batch_size=8, reset_on_mismatch=True) as third:
            await third.register()
            assert third.resets == 1
            assert (await third.info())["batch_size"] == 8

    asyncio.run(scenario())


def test_nan_group_surfaces_as_error_naming_batch_and_status(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url, batch_size=2, max_retries=1) as client:
            await client.register()
            raw = '{"tokens":[[1,2],[3,4]],"masks":[[-100,2],[-100,4]],"scores":[NaN,0.0]}'
            # Python's json (FastAPI's parser) accepts the NaN literal; only encoding it back fails.
            assert (await _env_call(url, "POST", "/scored_data", raw=raw))["status"] == "received"
            started = time.monotonic()
            with pytest.raises(AtroposAPIError) as err:
                await client.get_batch()
            assert time.monotonic() - started < 10
            message = str(err.value)
            assert "GET /batch" in message and "HTTP 500" in message and "NaN" in message and url in message
            # Not retried: the server already dropped that batch, a retry would hide the loss.
            assert client.retries == 0
            assert await client.get_batch() is None
            assert (await client.status()).current_step == 1

    asyncio.run(scenario())


def test_api_stopping_mid_run_raises_naming_url(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url, max_retries=2) as client:
            await client.register()
            assert await client.get_batch() is None
            atropos_api.stop()
            started = time.monotonic()
            with pytest.raises(AtroposAPIError) as err:
                await client.get_batch()
            assert time.monotonic() - started < 10
        assert url in str(err.value) and "GET /batch failed after 3 attempt(s)" in str(err.value)
        assert client.retries == 2

    asyncio.run(scenario())


def test_next_batch_deadline_and_stop_event(atropos_api: ApiServerProcess) -> None:
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url) as client:
            await client.register()
            await _env_call(url, "POST", "/scored_data", _group(2))
            started = time.monotonic()
            with pytest.raises(AtroposAPIError) as err:
                await client.next_batch(deadline_s=0.5)
            assert 0.4 <= time.monotonic() - started < 3
            assert "within 0.5s" in str(err.value) and "queue_size=1" in str(err.value)

            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.3, stop.set)
            started = time.monotonic()
            assert await client.next_batch(stop=stop) is None
            assert time.monotonic() - started < 1.5

    asyncio.run(scenario())


def test_stop_leaves_no_listener_and_no_process(atropos_api: ApiServerProcess) -> None:
    pid, port = atropos_api.pid, atropos_api.port
    os.kill(pid, 0)  # alive
    atropos_api.stop()
    atropos_api.stop()  # idempotent
    assert atropos_api.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
