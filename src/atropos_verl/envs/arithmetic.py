"""Single-digit arithmetic, answered with just the number: a built-in Atropos environment.

Each item is a question such as ``What is 7 + 5? Reply with only the number.``; the
policy should reply ``12``. The reward combines correctness and format (see
:func:`score_reply`): 1.0 for the bare correct number, a partial score for a correct
answer wrapped in words (``7 + 5 = 12``), 0 for a wrong answer or a reply cut off at
``max_new_tokens``. A small instruct model (SmolLM2-135M-Instruct) often gets the sum
right but almost never answers with the number alone, so the reward starts low and RL
raises it within tens of steps.

It is a real ``atroposlib`` ``BaseEnv``: with ``--openai.server_type vllm`` (or ``sglang``)
it samples through ``ManagedServer`` and sends exact tokens, masks and the sampler's
log-probs; with ``openai`` it uses chat completions and tokenizes the chat itself. Items
are generated from ``seed`` (no downloads). Run it against a trainer's gateway with::

    python -m atropos_verl.envs.arithmetic serve --env.rollout_server_url API \\
        --env.tokenizer_name MODEL_DIR --openai.base_url GATEWAY/v1 \\
        --openai.model_name NAME --openai.server_type vllm --openai.api_key unused
"""

from __future__ import annotations

import operator
import random
import re
from typing import Optional

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_INTEGER = re.compile(r"-?\d+")
_BARE_NUMBER = re.compile(r"-?\d+\.?")


def make_problem(rng: random.Random, low: int, high: int, operations: str) -> tuple[int, str, int]:
    """Draw ``(a, op, b)`` with operands in ``[low, high]``; subtraction never goes below zero."""
    op = rng.choice(operations)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def solve(a: int, op: str, b: int) -> int:
    return OPERATIONS[op](a, b)


def score_reply(reply: str, answer: int, finished: bool = True, partial_credit: float = 0.5) -> float:
    """Score one reply to an arithmetic question whose correct result is ``answer``.

    * ``1.0``: the reply is just the correct number (surrounding whitespace and one
      trailing period allowed), e.g. ``"12"`` or ``" 12."``.
    * ``partial_credit``: the reply says more than the number, but the last integer in it
      is the correct result, e.g. ``"7 + 5 = 12"`` or ``"The answer is 12."``.
    * ``0.0``: otherwise: a wrong or missing number, or a reply that did not finish
      (``finished=False``: cut off at the token limit), whatever it contains.
    """
    if not finished:
        return 0.0
    text = reply.strip()
    if _BARE_NUMBER.fullmatch(text):
        return 1.0 if int(text.rstrip(".")) == answer else 0.0
    numbers = _INTEGER.findall(text)
    if numbers and int(numbers[-1]) == answer:
        return partial_credit
    return 0.0


class ArithmeticEnvConfig(BaseEnvConfig):
    seed: int = Field(default=0, description="Seed of the question stream (items are a deterministic sequence)")
    min_operand: int = Field(default=0, description="Smallest operand")
    max_operand: int = Field(default=9, description="Largest operand")
    operations: str = Field(default="+", description="Operators to draw from, any of '+-*', e.g. '+-'")
    prompt_template: str = Field(
        default="What is {a} {op} {b}? Reply with only the number.",
        description="User message; {a}, {op} and {b} are filled in",
    )
    max_new_tokens: int = Field(default=16, description="Tokens sampled per reply; a reply cut off here scores 0")
    temperature: float = Field(default=0.7, description="Sampling temperature")
    partial_credit: float = Field(
        default=0.5, description="Score of a correct result wrapped in other words (the bare number scores 1)"
    )


class ArithmeticEnv(BaseEnv):
    name = "arithmetic"
    env_config_cls = ArithmeticEnvConfig

    @classmethod
    def config_init(cls):
        config = ArithmeticEnvConfig(
            group_size=8,
            use_wandb=False,
            max_num_workers=8,
            max_batches_offpolicy=1,
            total_steps=1000,
            steps_per_eval=0,
            max_token_length=512,
            ensure_scores_are_not_same=False,
            wandb_name=cls.name,
        )
        server = APIServerConfig(base_url="http://127.0.0.1:9000/v1", model_name="policy", server_type="vllm", api_key="unused")
        return config, [server]

    async def setup(self):
        cfg = self.config
        if not cfg.operations or set(cfg.operations) - set(OPERATIONS):
            raise ValueError(f"operations must be made of '+-*', got {cfg.operations!r}")
        if cfg.min_operand > cfg.max_operand:
            raise ValueError(f"min_operand {cfg.min_operand} > max_operand {cfg.max_operand}")
        self.rng = random.Random(cfg.seed)

    async def get_next_item(self):
        a, op, b = make_problem(self.rng, self.config.min_operand, self.config.max_operand, self.config.operations)
        messages = [{"role": "user", "content": self.config.prompt_template.format(a=a, op=op, b=b)}]
        return messages, solve(a, op, b)

    def _score(self, text: str, answer: int, finish_reason: Optional[str]) -> float:
        return score_reply(text, answer, finished=finish_reason != "length", partial_credit=self.config.partial_credit)

    async def collect_trajectories(self, item):
        messages, answer = item
        if self.server.servers[0].config.server_type == "openai":
            return await self._collect_via_chat(messages, answer), []
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completion = await managed.completion(
                prompt=prompt,
                n=self.config.group_size,
                max_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
            )
            nodes = managed.get_state()["nodes"]
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for node, choice in zip(nodes, completion.choices):
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["scores"].append(self._score(choice.text, answer, choice.finish_reason))
        group["generation_params"] = {"temperature": self.config.temperature}
        return group, []

    async def _collect_via_chat(self, messages, answer):
        """The OpenAI server type gives text only: tokenize the chat here."""
        completion = await self.server.chat_completion(
            messages=messages,
            n=self.config.group_size,
            max_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
        )
        prefix = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for choice in completion.choices:
            text = choice.message.content or ""
            chat = messages + [{"role": "assistant", "content": text}]
            tokens = list(self.tokenizer.apply_chat_template(chat, return_dict=False))
            group["tokens"].append(tokens)
            group["masks"].append([-100] * len(prefix) + tokens[len(prefix):])
            group["scores"].append(self._score(text, answer, choice.finish_reason))
        group["generation_params"] = {"temperature": self.config.temperature}
        return group

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ArithmeticEnv.cli()
