"""A third-party-style Atropos environment with a thinking-mode prompt.

Like Atropos' reasoning environments: a system prompt asks for ``<think>`` tags, the
policy is sampled through ``ManagedServer`` chat completions (exact tokens, masks and
log-probs), ``config_init`` returns a list of server configs. The reward favours the
answer after the thinking block being made of words: the fraction of its characters that
are letters or spaces, which varies from sample to sample.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.type_definitions import Item

system_prompt = (
    "You are a deep thinking AI. Enclose your thoughts inside <think> </think> tags, "
    "then give a short answer in plain words."
)
PROMPTS = ["Describe the sky.", "What do cats eat?", "Say hello."]


def wordiness(reply: str) -> float:
    answer = reply.split("</think>")[-1]
    if not answer:
        return 0.0
    return sum(c.isalpha() or c == " " for c in answer) / len(answer)


class ThinkEnv(BaseEnv):
    name = "think"

    @classmethod
    def config_init(cls) -> Tuple[BaseEnvConfig, List[APIServerConfig]]:
        env_config = BaseEnvConfig(
            tokenizer_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            group_size=4,
            use_wandb=False,
            total_steps=1000,
            batch_size=16,
            steps_per_eval=100,
            max_token_length=1024,
            wandb_name="think",
        )
        server_configs = [
            APIServerConfig(
                model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                base_url="http://localhost:9001/v1",
                api_key="x",
                num_requests_for_eval=16,
            ),
        ]
        return env_config, server_configs

    async def setup(self):
        self.iter = 0

    async def get_next_item(self) -> Item:
        self.iter += 1
        return PROMPTS[self.iter % len(PROMPTS)]

    async def collect_trajectories(self, item: Item) -> Tuple[Optional[ScoredDataGroup], list[Item]]:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": item}]
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completions = await managed.chat_completion(
                messages=messages, n=self.config.group_size, max_tokens=12, temperature=1.0
            )
            nodes = managed.get_state()["nodes"]
        scores = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for choice, node in zip(completions.choices, nodes):
            scores["tokens"].append(node.tokens)
            scores["masks"].append(node.masked_tokens)
            scores["inference_logprobs"].append(node.logprobs)
            scores["scores"].append(wordiness(choice.message.content or ""))
        return scores, []

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ThinkEnv.cli()
