"""The gateway never reuses a backend connection the backend may be closing.

The backend is a real uvicorn server, the HTTP server vLLM and SGLang run, with its default
keep-alive of 5 s (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE); it answers with the client port each
request arrived from, so the test sees which connection the gateway used.
"""

import asyncio
import json

import aiohttp
import uvicorn

from atropos_verl.netutil import free_port
from atropos_verl.serving.gateway import Gateway

SERVER_KEEPALIVE_S = 5


async def backend(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"choices": [{"index": 0, "text": "x"}], "client_port": scope["client"][1]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def client_ports(gaps_s: list[float]) -> list[int]:
    port = free_port()
    config = uvicorn.Config(
        backend, host="127.0.0.1", port=port, timeout_keep_alive=SERVER_KEEPALIVE_S, log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    gateway = Gateway([f"http://127.0.0.1:{port}"], model_name="policy")
    try:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.05)
        await gateway.start()
        ports = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for gap in [0.0, *gaps_s]:
                await asyncio.sleep(gap)
                async with session.post(f"{gateway.url}/v1/completions", json={"prompt": "x"}) as response:
                    assert response.status == 200, await response.text()
                    ports.append((await response.json())["client_port"])
        return ports
    finally:
        await gateway.stop()
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


def test_idle_backend_connections_are_dropped_before_the_backend_drops_them():
    # Back to back: the pooled connection is reused (no connect per request). After 3.5 s idle,
    # short of the server's 5 s, the gateway has dropped it and opens a new one.
    first, second, third = asyncio.run(asyncio.wait_for(client_ports([0.1, 3.5]), 30))
    assert first == second, "a connection used a moment ago should be reused"
    assert third != second, "a connection idle for 3.5 s is one the backend may close as it is reused"
