"""A third-party-style Atropos environment: ask for a number, reward replies holding a digit.

Written the way Atropos' own environments are: ``config_init`` returns a *single*
``APIServerConfig`` (atroposlib then ignores its base_url unless
``atropos_verl.atropos.compat`` is applied), ``use_wandb=True`` by default, chat
completions through the OpenAI server type, and ``tokenize_for_trainer`` for tokens and
masks (which yields no trainable token under transformers 5 without the compat fix).
"""

from __future__ import annotations

import random
from typing import Optional, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.type_definitions import Item
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer

QUESTIONS = [
    "Pick a number between 1 and 10.",
    "How many legs does a cat have?",
    "What is 2 + 3?",
    "Name a year.",
]


def digit_reward(reply: str) -> float:
    # A digit is the task; length breaks ties so a group is rarely all-equal.
    return float(any(c.isdigit() for c in reply)) + min(len(reply), 80) / 100


class DigitEnv(BaseEnv):
    name = "digits"

    @classmethod
    def config_init(cls) -> Tuple[BaseEnvConfig, APIServerConfig]:
        env_config = BaseEnvConfig(
            tokenizer_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            group_size=4,
            use_wandb=True,
            rollout_server_url="http://localhost:8000",
            total_steps=1000,
            batch_size=16,
            steps_per_eval=100,
            max_token_length=512,
            wandb_name="digits",
        )
        server_config = APIServerConfig(
            model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            base_url="http://localhost:9001/v1",
            api_key="x",
            server_type="openai",
        )
        return env_config, server_config

    async def setup(self):
        self.rng = random.Random(0)

    async def get_next_item(self) -> Item:
        return self.rng.choice(QUESTIONS)

    async def collect_trajectories(self, item: Item) -> Tuple[Optional[ScoredDataGroup], list[Item]]:
        messages = [{"role": "user", "content": item}]
        completion = await self.server.chat_completion(
            messages=messages, n=self.config.group_size, max_tokens=12, temperature=1.0
        )
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for choice in completion.choices:
            reply = choice.message.content or ""
            chat = messages + [{"role": "assistant", "content": reply}]
            out = tokenize_for_trainer(self.tokenizer, chat, finish_reason=choice.finish_reason)
            group["tokens"].append(out["tokens"])
            group["masks"].append(out["masks"])
            group["scores"].append(digit_reward(reply))
        return group, []

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    DigitEnv.cli()
