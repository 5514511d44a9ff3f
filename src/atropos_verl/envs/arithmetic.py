"""Single-digit arithmetic with short answers: a built-in Atropos environment.

Each item is a question such as ``What is 7 + 5? Keep your answer short.``. The reward
combines correctness and brevity (see :func:`score_reply`): 1.0 for the correct result
in at most ``max_words`` words (``12`` or ``7 + 5 = 12``), a partial score for a correct
result in a longer reply, 0 for a wrong result or a reply cut off at ``max_new_tokens``.
SmolLM2-135M-Instruct starts around 0.3: it often rambles or gets the sum wrong, and
RL makes it answer correctly and concisely within tens of steps on a CPU.

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
from typing import Literal, Optional

from atroposlib.envs.base import BaseEnv, BaseEnvConfig
from pydantic import Field

from atropos_verl.data.sources import render_prompt, resolve_prompt_format
from atropos_verl.envs.sampling import (
    placeholder_server,
    returns_text_only,
    sample_chat_text,
    sample_managed,
    scored_group,
    supervised_env_defaults,
)

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_INTEGER = re.compile(r"-?\d+")


def make_problem(rng: random.Random, low: int, high: int, operations: str) -> tuple[int, str, int]:
    """Draw ``(a, op, b)`` with operands in ``[low, high]``; subtraction never goes below zero."""
    op = rng.choice(operations)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def solve(a: int, op: str, b: int) -> int:
    return OPERATIONS[op](a, b)


def score_reply(
    reply: str, answer: int, finished: bool = True, max_words: int = 5, partial_credit: float = 0.25
) -> float:
    """Score one reply to an arithmetic question whose correct result is ``answer``.

    The reply's result is the last integer in it (``"12"``, ``"7 + 5 = 12"`` and
    ``"The answer is 12."`` all answer 12).

    * ``1.0``: the result is correct and the reply has at most ``max_words``
      whitespace-separated words (``max_words=1`` demands the bare number).
    * ``partial_credit``: the result is correct but the reply is longer.
    * ``0.0``: a wrong or missing result, or a reply that did not finish
      (``finished=False``: cut off at the token limit), whatever it contains.
    """
    if not finished:
        return 0.0
    numbers = _INTEGER.findall(reply)
    if not numbers or int(numbers[-1]) != answer:
        return 0.0
    return 1.0 if len(reply.split()) <= max_words else partial_credit


class ArithmeticEnvConfig(BaseEnvConfig):
    seed: int = Field(default=0, description="Seed of the question stream (items are a deterministic sequence)")
    min_operand: int = Field(default=0, description="Smallest operand")
    max_operand: int = Field(default=9, description="Largest operand")
    operations: str = Field(default="+", description="Operators to draw from, any of '+-*', e.g. '+-'")
    prompt_template: str = Field(
        default="What is {a} {op} {b}? Keep your answer short.",
        description="User message; {a}, {op} and {b} are filled in",
    )
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        default="auto",
        description="chat: the tokenizer's chat template; plain: the question as is (models without a template, "
        "e.g. DialoGPT); auto: chat when the tokenizer has a template, else plain",
    )
    max_new_tokens: int = Field(default=16, description="Tokens sampled per reply; a reply cut off here scores 0")
    temperature: float = Field(default=0.7, description="Sampling temperature")
    max_words: int = Field(
        default=5, description="A correct reply of at most this many words scores 1 (1: bare number)"
    )
    partial_credit: float = Field(
        default=0.25, description="Score of a correct result in a reply longer than max_words"
    )


class ArithmeticEnv(BaseEnv):
    name = "arithmetic"
    env_config_cls = ArithmeticEnvConfig

    @classmethod
    def config_init(cls):
        config = ArithmeticEnvConfig(
            **supervised_env_defaults(cls.name),
            group_size=8,
            max_num_workers=8,
            max_batches_offpolicy=1,
            steps_per_eval=0,
            max_token_length=512,
            ensure_scores_are_not_same=False,
        )
        return config, placeholder_server()

    async def setup(self):
        cfg = self.config
        if not cfg.operations or set(cfg.operations) - set(OPERATIONS):
            raise ValueError(f"operations must be made of '+-*', got {cfg.operations!r}")
        if cfg.min_operand > cfg.max_operand:
            raise ValueError(f"min_operand {cfg.min_operand} > max_operand {cfg.max_operand}")
        cfg.prompt_format = resolve_prompt_format(self.tokenizer, cfg.prompt_format)
        if cfg.prompt_format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {cfg.tokenizer_name} has no chat template: use --env.prompt_format plain")
        if cfg.prompt_format == "plain" and returns_text_only(self):
            # Chat completions need a template; plain text goes through ManagedServer's exact tokens.
            raise ValueError("--env.prompt_format plain needs --openai.server_type vllm or sglang, not openai")
        self.rng = random.Random(cfg.seed)

    async def get_next_item(self):
        a, op, b = make_problem(self.rng, self.config.min_operand, self.config.max_operand, self.config.operations)
        messages = [{"role": "user", "content": self.config.prompt_template.format(a=a, op=op, b=b)}]
        return messages, solve(a, op, b)

    def _score(self, text: str, answer: int, finish_reason: Optional[str]) -> float:
        cfg = self.config
        return score_reply(
            text, answer, finished=finish_reason != "length", max_words=cfg.max_words, partial_credit=cfg.partial_credit
        )

    async def collect_trajectories(self, item):
        messages, answer = item
        cfg = self.config
        if returns_text_only(self):
            samples = await sample_chat_text(self, messages, cfg.group_size, cfg.max_new_tokens, cfg.temperature)
        else:
            prompt = render_prompt(self.tokenizer, messages, cfg.prompt_format).text
            samples = await sample_managed(self, prompt, cfg.group_size, cfg.max_new_tokens, cfg.temperature)
        scores = [self._score(sample.text, answer, sample.finish_reason) for sample in samples]
        return scored_group(samples, scores, cfg.temperature), []

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ArithmeticEnv.cli()
