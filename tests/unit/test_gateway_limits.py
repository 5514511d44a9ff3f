"""The gateway refuses what no replica should see (400/401/408), before any backend is involved.

A real Gateway with no backends: a valid request would wait for one (and time out with 503),
so every answer below comes from the gateway's own checks.
"""

import asyncio
import socket
import time

import aiohttp
import pytest

from atropos_verl.serving.gateway import Gateway

KEY = "s3cret"


async def with_gateway(scenario, **kwargs):
    gateway = Gateway([], model_name="policy", api_key=KEY, max_wait_s=0.5, max_model_len=256, **kwargs)
    await gateway.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            return await asyncio.wait_for(scenario(gateway, session), 30)
    finally:
        await gateway.stop()


async def post(session, url, body=None, data=None, headers=None):
    async with session.post(url, json=body, data=data, headers=headers) as response:
        return response.status, await response.text()


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "x", "n": 400000}, "n must be an integer in [1, 256]"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n must be"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -5}, "max_tokens must be a non-negative integer"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, "exceeds the served context of 256"),
        ("/v1/chat/completions", {"messages": [], "max_completion_tokens": 999}, "max_completion_tokens 999"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature must be"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
        ("/generate", {"prompt": {"prompt_token_ids": [1]}, "n": 10**6}, "n must be"),
        ("/generate", {"input_ids": [1], "sampling_params": {"n": 10**6, "temperature": 0}}, "n must be"),
        ("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 4096}}, "exceeds the served context"),
    ],
)
def test_sampling_values_are_refused_with_400(path, body, message):
    async def scenario(gateway, session):
        return await post(session, f"{gateway.url}{path}", body)

    status, text = asyncio.run(with_gateway(scenario))
    assert status == 400 and message in text, text


def test_malformed_bodies_and_headers_are_400_or_401_never_500():
    async def scenario(gateway, session):
        url = f"{gateway.url}/v1/completions"
        deep = b"[" * 100_000 + b"]" * 100_000
        answers = [
            await post(session, url, data=b"{not json"),
            await post(session, url, data=deep),
            await post(session, url, data=b"{}", headers={"Content-Type": "application/json; charset=klingon"}),
            await post(session, url, data=b"\xff\xfe{", headers={"Content-Type": "application/json"}),
            await post(session, url, data=b"[1, 2]"),
        ]
        # Undecodable bytes in the token: compared, refused, not a server error.
        reader, writer = await asyncio.open_connection(
            gateway.url.split("//")[1].split(":")[0], int(gateway.url.rsplit(":", 1)[1])
        )
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nContent-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return answers, status_line

    answers, status_line = asyncio.run(with_gateway(scenario))
    assert [status for status, _ in answers] == [400, 400, 400, 400, 400], answers
    assert b" 401 " in status_line, status_line


def test_a_connection_that_sends_nothing_is_dropped():
    async def scenario(gateway, session):
        host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.settimeout(10)
            # The server closes the idle connection: recv returns b"" (EOF).
            data = await asyncio.to_thread(sock.recv, 1)
        return data, time.monotonic() - started

    data, waited = asyncio.run(with_gateway(scenario, idle_timeout_s=1.0))
    assert data == b"" and waited < 8, (data, waited)
