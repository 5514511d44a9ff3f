"""A third-party-style Atropos environment that evaluates before it trains.

It scores how many of the prompt's letters a completion repeats, samples raw completions
through ``ManagedServer``, asks for at least a share of every batch
(``min_batch_allocation``), and runs its evaluation once at start-up, as environments
that log a baseline do. The policy server may still be starting then, so the
evaluation waits for it, within a bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import List, Optional, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.type_definitions import Item

WORDS = ["banana", "river", "orange", "window"]
EVAL_WAIT_S = 600.0


def overlap(word: str, text: str) -> float:
    return sum(c in word for c in text) / max(len(text), 1)


class EchoEnv(BaseEnv):
    name = "echo"

    @classmethod
    def config_init(cls) -> Tuple[BaseEnvConfig, List[APIServerConfig]]:
        env_config = BaseEnvConfig(
            tokenizer_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            group_size=2,
            use_wandb=False,
            total_steps=1000,
            batch_size=16,
            steps_per_eval=100,
            min_batch_allocation=0.25,
            wandb_name="echo",
        )
        return env_config, [APIServerConfig(model_name="policy", base_url="http://localhost:9001/v1", api_key="x")]

    async def setup(self):
        self.iter = 0
        self.eval_scores: list[float] = []
        await self.evaluate()

    async def get_next_item(self) -> Item:
        self.iter += 1
        return WORDS[self.iter % len(WORDS)]

    async def _sample(self, word: str, n: int, temperature: float):
        prompt = f"Repeat the word: {word}\n"
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completion = await managed.completion(prompt=prompt, n=n, max_tokens=8, temperature=temperature)
            nodes = managed.get_state()["nodes"]
        return completion, nodes

    async def collect_trajectories(self, item: Item) -> Tuple[Optional[ScoredDataGroup], list[Item]]:
        completion, nodes = await self._sample(item, self.config.group_size, 1.0)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for choice, node in zip(completion.choices, nodes):
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["scores"].append(overlap(item, choice.text))
        return group, []

    async def evaluate(self, *args, **kwargs):
        start = time.time()
        while True:
            try:
                completion, _ = await self._sample(WORDS[0], 1, 0.0)
                break
            except Exception:
                if time.time() - start > EVAL_WAIT_S:
                    raise
                await asyncio.sleep(2)
        score = overlap(WORDS[0], completion.choices[0].text)
        self.eval_scores.append(score)
        await self.evaluate_log(metrics={"eval/overlap": score}, start_time=start, end_time=time.time())


if __name__ == "__main__":
    EchoEnv.cli()
