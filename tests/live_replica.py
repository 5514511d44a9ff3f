"""A live inference replica (vLLM or SGLang) that serves a whole test module, and its references.

``tests/integration/test_vllm_replica.py`` and ``test_sglang.py`` start one replica per module
(start-up dominates the cost) through :func:`serve_module`; each engine's ``Live`` adds its own
request format. The references are the transformers model's own prompt log-probs.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from atropos_verl.serving.replicas.access import TOKEN_HEADER

T = TypeVar("T")
L = TypeVar("L", bound="Live")

PROMPT = "The quick brown fox jumps over the lazy dog because"


@dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    replica: Any
    session: aiohttp.ClientSession

    def run(self, awaitable: Awaitable[T], timeout_s: float = 60.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, timeout_s))


def serve_module(live_cls: type[L], replica: Any, start_timeout_s: float, token: str, engine: str) -> Iterator[L]:
    """Start ``replica``, yield it with a session that holds ``token``, stop it at the end (a fixture's body)."""
    loop = asyncio.new_event_loop()
    try:
        started = time.monotonic()
        loop.run_until_complete(replica.start(timeout_s=start_timeout_s))
        print(f"\n{engine} replica ready in {time.monotonic() - started:.1f}s")
        session = loop.run_until_complete(new_session(token))
        try:
            yield live_cls(loop=loop, replica=replica, session=session)
        finally:
            loop.run_until_complete(session.close())
    finally:
        loop.run_until_complete(replica.stop())
        loop.close()


async def new_session(token: str | None) -> aiohttp.ClientSession:
    headers = {TOKEN_HEADER: token} if token else {}
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), headers=headers)


async def route_statuses(base_url: str, token: str | None, routes: dict[str, tuple[str, Any]]) -> dict[str, int]:
    """The HTTP status of each ``path: (method, json body or None)`` for a client holding ``token``."""
    async with await new_session(token) as session:
        statuses = {}
        for path, (method, body) in routes.items():
            async with session.request(method, f"{base_url}{path}", json=body) as response:
                statuses[path] = response.status
        return statuses


def port_accepts(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def prompt_ids_of(tokenizer_path: str) -> list[int]:
    from transformers import AutoTokenizer

    ids: list[int] = AutoTokenizer.from_pretrained(tokenizer_path)(PROMPT)["input_ids"]
    return ids


def save_perturbed(model_dir: str, out: Path) -> str:
    """The model with noise on every Linear weight, saved with HF names into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return str(out)


def hf_prompt_logprobs(model_dir: str, prompt_ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1)).squeeze(1).tolist()
