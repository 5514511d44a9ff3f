"""atroposlib's own server clients pointed at a gateway, as an environment's ``--openai.*`` flags point them.

Shared by the gateway tests against vLLM (``tests/integration/test_gateway.py``) and SGLang
(``test_sglang.py``): the same client calls must hold whichever engine serves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from atroposlib.envs.server_handling.server_baseline import APIServer, APIServerConfig
from atroposlib.envs.server_handling.server_manager import ServerManager

from atropos_verl.serving.gateway import Gateway

ENV_MODEL_NAME = "org/hub-name-of-the-policy"  # what environments put in "model"


def client_config(gateway: Gateway, tokenizer: str, server_type: str, api_key: str = "unused") -> APIServerConfig:
    return APIServerConfig(
        base_url=f"{gateway.url}/v1",
        model_name=ENV_MODEL_NAME,
        tokenizer_name=tokenizer,
        server_type=server_type,
        api_key=api_key,
        timeout=60,
    )


async def stop_health_checks(servers: list[APIServer]) -> None:
    # atroposlib's clients start an endless health-check task on first use.
    for server in servers:
        if server.check_task is not None:
            server.check_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server.check_task


@contextlib.asynccontextmanager
async def atropos_client(
    cls: type[APIServer], gateway: Gateway, tokenizer: str, server_type: str, api_key: str = "unused"
) -> AsyncIterator[Any]:
    server = cls(client_config(gateway, tokenizer, server_type, api_key))
    try:
        yield server
    finally:
        await stop_health_checks([server])


async def managed_chat_nodes(gateway: Gateway, tokenizer: str, server_type: str, api_key: str = "unused") -> list[Any]:
    """The path most environments take (ServerManager -> ManagedServer -> /generate): two answers of
    at most 5 tokens to one chat, checked as a trainer reads them; their tracked nodes."""
    manager = ServerManager([client_config(gateway, tokenizer, server_type, api_key)])
    try:
        async with manager.managed_server(tokenizer=manager.servers[0].tokenizer) as managed:
            chat = await managed.chat_completion(
                messages=[{"role": "user", "content": "What is 2 + 2?"}], n=2, max_tokens=5, temperature=1.0
            )
            nodes = managed.get_state()["nodes"]
    finally:
        await stop_health_checks(manager.servers)
    assert len(chat.choices) == len(nodes) == 2
    for node in nodes:
        assert len(node.tokens) == len(node.masked_tokens) == len(node.logprobs)
        completion = [i for i, m in enumerate(node.masked_tokens) if m != -100]
        assert 1 <= len(completion) <= 5 and completion[-1] == len(node.tokens) - 1
        assert all(node.logprobs[i] <= 0.0 and node.masked_tokens[i] == node.tokens[i] for i in completion)
    return nodes
