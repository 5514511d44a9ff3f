"""How the built-in environments sample a group of answers, whatever the server type.

With atroposlib's ``vllm`` / ``sglang`` server types, ``ManagedServer`` returns the
exact token ids, loss masks and the sampler's log-probs. The ``openai`` type gives text
only, so the chat is tokenized here. (atroposlib's ``tokenize_for_trainer`` returns a
``BatchEncoding`` under transformers 5, so the ids come from ``apply_chat_template``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from atroposlib.envs.base import APIServerConfig, BaseEnv, ScoredDataGroup

IGNORED = -100


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    masks: list[int]
    # The sampler's log-probs (ManagedServer only), 1.0 at prompt positions.
    logprobs: Optional[list[float]]
    text: str
    finish_reason: Optional[str]


def supervised_env_defaults(name: str) -> dict[str, Any]:
    """``BaseEnvConfig`` values every environment the trainer starts shares; ``config_init`` adds its own.

    The trainer stops its environments; one that stopped itself would be restarted
    (atroposlib's own stop counts batches formed, which run ahead of steps trained).
    """
    return {"use_wandb": False, "total_steps": 1_000_000_000, "wandb_name": name}


def placeholder_server() -> list[APIServerConfig]:
    """The server list of ``config_init``; the trainer's launcher passes the gateway's URL and model."""
    return [
        APIServerConfig(base_url="http://127.0.0.1:9000/v1", model_name="policy", server_type="vllm", api_key="unused")
    ]


def returns_text_only(env: BaseEnv) -> bool:
    return env.server.servers[0].config.server_type == "openai"


async def sample_managed(env: BaseEnv, prompt: str, n: int, max_tokens: int, temperature: float) -> list[Sample]:
    """``n`` answers to the rendered ``prompt`` through ``ManagedServer``: exact tokens, masks, log-probs."""
    async with env.server.managed_server(tokenizer=env.tokenizer) as managed:
        completion = await managed.completion(prompt=prompt, n=n, max_tokens=max_tokens, temperature=temperature)
        nodes = managed.get_state()["nodes"]
    return [
        Sample(node.tokens, node.masked_tokens, node.logprobs, choice.text, choice.finish_reason)
        for node, choice in zip(nodes, completion.choices)
    ]


async def sample_chat_text(
    env: BaseEnv, messages: list[dict], n: int, max_tokens: int, temperature: float
) -> list[Sample]:
    """``n`` answers through chat completions (text only); prompt and answers tokenized with the chat template."""
    completion = await env.server.chat_completion(
        messages=messages, n=n, max_tokens=max_tokens, temperature=temperature
    )
    prefix = env.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    samples = []
    for choice in completion.choices:
        text = choice.message.content or ""
        tokens = list(
            env.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": text}], return_dict=False)
        )
        samples.append(
            Sample(tokens, [IGNORED] * len(prefix) + tokens[len(prefix) :], None, text, choice.finish_reason)
        )
    return samples


def scored_group(samples: list[Sample], scores: list[float], temperature: float) -> ScoredDataGroup:
    """The group the API receives; the sampler's log-probs go along when every answer has them."""
    group = ScoredDataGroup(tokens=[s.tokens for s in samples], masks=[s.masks for s in samples], scores=scores)
    if all(s.logprobs is not None for s in samples):
        group["inference_logprobs"] = [s.logprobs for s in samples]
    group["generation_params"] = {"temperature": temperature}
    return group
