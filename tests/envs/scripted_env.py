"""A real atroposlib ``BaseEnv`` that sends scripted multi-turn groups without an inference server.

Run like any Atropos environment::

    python tests/envs/scripted_env.py serve --env.rollout_server_url http://127.0.0.1:PORT \\
        --env.tokenizer_name MODEL_DIR

Every group has the same shape, so tests can predict the trainer's numbers:
four sequences ``prompt | answer | tool output | follow-up`` where the prompt and
the tool output (mid-sequence) are masked with -100 and both assistant turns are
trained. Scores are ``[1, 0, 1, 0]``. Item 1 is a deliberately invalid group
(a token id outside the vocabulary) that the API accepts and the trainer must
reject, item 2 a ``score`` group; the env holds item 3 back until the API has
formed a batch, so with batch_size 8 the trainer's first batch is exactly
items 1 and 2 (the API serves batches formed together last-in first-out, so
only this gate makes the order predictable). After that, items alternate between

* ``score`` groups: advantages come from scores, sequence 3 has
  ``overrides.set_advantage_to_zero`` and the group samples at temperature 0.7;
* ``token`` groups: the env sends token-level ``advantages`` (5.0, -1.0, 0.5,
  -0.5 per sequence, the first beyond the default clip) and ``inference_logprobs``.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from ledger import PostLedger
from pydantic import Field

from atropos_verl.envs.sampling import supervised_env_defaults

IGNORED = -100
SCORES = [1.0, 0.0, 1.0, 0.0]
ENV_ADVANTAGES = [5.0, -1.0, 0.5, -0.5]
SAMPLED_LOGPROB = -2.0
SCORE_GROUP_TEMPERATURE = 0.7

PROMPT = "Question: what is two plus two? Use the calculator."
ANSWERS = [" The answer is four.", " The answer is five."]
TOOL_OUTPUT = " [calculator] 2 + 2 = 4"
FOLLOW_UPS = [" Confirmed, four.", " Hmm, still five."]


def sequence_parts(tokenizer, correct: bool) -> list[tuple[list[int], bool]]:
    """(token ids, trained) spans of one sequence."""
    choice = 0 if correct else 1
    return [
        (tokenizer.encode(PROMPT, add_special_tokens=False), False),
        (tokenizer.encode(ANSWERS[choice], add_special_tokens=False), True),
        (tokenizer.encode(TOOL_OUTPUT, add_special_tokens=False), False),
        (tokenizer.encode(FOLLOW_UPS[choice], add_special_tokens=False), True),
    ]


def build_group(tokenizer, kind: str, vocab_size: Optional[int] = None) -> ScoredDataGroup:
    """One scripted group; ``kind`` is ``score``, ``token`` or ``invalid``."""
    tokens, masks, advantages, logprobs = [], [], [], []
    for i, score in enumerate(SCORES):
        parts = sequence_parts(tokenizer, correct=score > 0)
        seq = [t for ids, _ in parts for t in ids]
        mask = [t if trained else IGNORED for ids, trained in parts for t in ids]
        tokens.append(seq)
        masks.append(mask)
        advantages.append([ENV_ADVANTAGES[i]] * len(seq))
        logprobs.append([SAMPLED_LOGPROB if m != IGNORED else 1.0 for m in mask])
    group = ScoredDataGroup(tokens=tokens, masks=masks, scores=list(SCORES))
    if kind == "score":
        group["overrides"] = [{}, {}, {}, {"set_advantage_to_zero": True}]
        group["generation_params"] = {"temperature": SCORE_GROUP_TEMPERATURE}
    elif kind == "token":
        group["advantages"] = advantages
        group["inference_logprobs"] = logprobs
    elif kind == "invalid":
        assert vocab_size is not None
        group["tokens"][0][-1] = vocab_size + 5
    else:
        raise ValueError(kind)
    return group


def trained_tokens_per_sequence(tokenizer) -> int:
    """Trained tokens of one sequence; every scripted sequence has the same count."""
    return sum(len(ids) for ids, trained in sequence_parts(tokenizer, correct=True) if trained)


class ScriptedEnvConfig(BaseEnvConfig):
    vocab_size: int = Field(default=49152, description="Vocabulary size, to build the invalid group")
    pattern: str = Field(
        default="mixed",
        description="mixed: invalid, then score/token groups alternating (see module doc); "
        "score: only identical score groups, so every batch is the same; "
        "equal: score groups whose answers all score 1.0, which BaseEnv drops (ensure_scores_are_not_same)",
    )


class ScriptedMultiTurnEnv(PostLedger, BaseEnv):
    name = "scripted_multiturn"
    env_config_cls = ScriptedEnvConfig

    @classmethod
    def config_init(cls):
        config = ScriptedEnvConfig(
            **supervised_env_defaults(cls.name),
            group_size=len(SCORES),
            max_num_workers=1,
            max_batches_offpolicy=4,
            steps_per_eval=0,
            ensure_scores_are_not_same=True,
        )
        # Never contacted: collect_trajectories scripts the completions.
        return config, [APIServerConfig(base_url="http://127.0.0.1:9/v1", model_name="scripted", api_key="x")]

    async def setup(self):
        self.item = 0

    async def get_next_item(self):
        self.item += 1
        return self.item

    async def collect_trajectories(self, item):
        if self.config.pattern == "score":
            return build_group(self.tokenizer, "score"), []
        if self.config.pattern == "equal":
            # Every group is dropped at once: without a pause the env would spin on a shared CPU.
            await asyncio.sleep(0.5)
            group = build_group(self.tokenizer, "score")
            group["scores"] = [1.0] * len(SCORES)
            return group, []
        while item >= 3 and self.curr_step < 1:
            await asyncio.sleep(0.05)
        if item == 1:
            kind = "invalid"
        else:
            kind = "score" if item % 2 == 0 else "token"
        return build_group(self.tokenizer, kind, self.config.vocab_size), []

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ScriptedMultiTurnEnv.cli()
