"""engine.in_flight: a sync either waits for running requests (drain) or leaves them to the engine (keep).

A real Gateway in front of a backend that answers a completion only when the test lets it,
so a request is provably in flight while the gateway pauses.
"""

import asyncio

import aiohttp
import pytest
from aiohttp import web

from atropos_verl.config import EngineConfig, RunConfig
from atropos_verl.serving.gateway import Gateway


async def held_backend(release: asyncio.Event, started: asyncio.Event):
    async def completions(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.json_response({"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def pause_with_a_request_in_flight(drain: bool) -> dict:
    release, started = asyncio.Event(), asyncio.Event()
    runner, backend = await held_backend(release, started)
    gateway = Gateway([backend], model_name="policy", max_wait_s=30)
    await gateway.start()
    gateway.resume(0)
    try:
        async with aiohttp.ClientSession() as session:

            async def complete():
                async with session.post(f"{gateway.url}/v1/completions", json={"prompt": "x"}) as response:
                    return response.status, response.headers.get("X-Policy-Version")

            in_flight = asyncio.create_task(complete())
            await asyncio.wait_for(started.wait(), 10)
            pause = asyncio.create_task(gateway.pause(drain_timeout_s=5.0, drain=drain))
            await asyncio.sleep(0.2)
            returned_while_in_flight = pause.done()
            release.set()
            drained = await asyncio.wait_for(pause, 10)
            gateway.resume(1)
            status, version = await asyncio.wait_for(in_flight, 10)
            return {"early": returned_while_in_flight, "drained": drained, "status": status, "version": version}
    finally:
        await gateway.stop()
        await runner.cleanup()


def test_drain_waits_for_the_running_request():
    result = asyncio.run(pause_with_a_request_in_flight(drain=True))
    assert result == {"early": False, "drained": True, "status": 200, "version": "0"}


def test_keep_pauses_at_once_and_the_request_keeps_the_version_it_started_under():
    result = asyncio.run(pause_with_a_request_in_flight(drain=False))
    assert result == {"early": True, "drained": True, "status": 200, "version": "0"}


def test_keep_needs_vllm():
    RunConfig(engine=EngineConfig(kind="vllm", in_flight="keep")).engine.validate()
    with pytest.raises(ValueError, match="engine.in_flight.*keep needs engine.kind=vllm"):
        EngineConfig(kind="sglang", in_flight="keep").validate()
    with pytest.raises(ValueError, match="engine.in_flight"):
        EngineConfig(kind="vllm", in_flight="sometimes").validate()
