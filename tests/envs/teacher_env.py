"""A real atroposlib ``BaseEnv`` that sends what a reference model and a teacher model say about its sequences.

Every group is the same four scripted answers to one prompt (prompt masked, answer
trained, scores ``[1, 0, 1, 0]``), sent with

* ``ref_logprobs``: each token's log-prob under the reference model, the model at
  ``--env.tokenizer_name`` (the trainer passes the policy's own folder, so the reference
  is the policy's starting point);
* ``distill_token_ids`` / ``distill_logprobs``: the top-``top_k`` tokens of a teacher for
  every position after the first, with their log-probs: the same architecture with other
  weights (seed 1, a larger initialisation so that its distributions are peaked).

At start-up it evaluates once through ``evaluate_log``, as environments that log a
baseline do: the reference's mean log-prob of the answers and the teacher's mean top-k mass.
"""

from __future__ import annotations

import copy
import time

import torch
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field
from transformers import AutoConfig, AutoModelForCausalLM

from atropos_verl.envs.sampling import supervised_env_defaults

IGNORED = -100
SCORES = [1.0, 0.0, 1.0, 0.0]
PROMPT = "Question: name a fruit."
ANSWERS = [" A ripe banana.", " A blue river.", " An orange, I think.", " The window is open."]
TEACHER_SEED = 1
TEACHER_INIT_RANGE = 0.5


def teacher_model(model_dir: str) -> torch.nn.Module:
    """The tiny model's architecture with other weights."""
    config = AutoConfig.from_pretrained(model_dir)
    config.initializer_range = TEACHER_INIT_RANGE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEACHER_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def sequences(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    tokens, masks = [], []
    for answer in ANSWERS:
        ids = tokenizer.encode(answer, add_special_tokens=False)
        tokens.append(prompt + ids)
        masks.append([IGNORED] * len(prompt) + ids)
    return tokens, masks


@torch.no_grad()
def token_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """(len, V) log-softmax; row t is the distribution of token t (row 0 is unused)."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return torch.cat([torch.zeros_like(logprobs[:1]), logprobs[:-1]])


class TeacherEnvConfig(BaseEnvConfig):
    top_k: int = Field(default=8, description="Teacher tokens sent per position")


class TeacherEnv(BaseEnv):
    name = "teacher"
    env_config_cls = TeacherEnvConfig

    @classmethod
    def config_init(cls):
        config = TeacherEnvConfig(
            **supervised_env_defaults(cls.name),
            group_size=len(SCORES),
            max_num_workers=1,
            max_batches_offpolicy=4,
            steps_per_eval=0,
        )
        # Never contacted: the answers are scripted.
        return config, [APIServerConfig(base_url="http://127.0.0.1:9/v1", model_name="scripted", api_key="x")]

    async def setup(self):
        model_dir = self.config.tokenizer_name
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        teacher = teacher_model(model_dir)
        tokens, masks = sequences(self.tokenizer)
        group = ScoredDataGroup(tokens=tokens, masks=masks, scores=list(SCORES))
        group["ref_logprobs"], group["distill_token_ids"], group["distill_logprobs"] = [], [], []
        answer_logprob, teacher_mass = [], []
        for seq, mask in zip(tokens, masks):
            ref = token_logprobs(reference, seq)
            picked = ref.gather(1, torch.tensor(seq)[:, None]).squeeze(1)
            picked[0] = 0.0
            group["ref_logprobs"].append(picked.tolist())
            answer_logprob += [picked[t].item() for t in range(1, len(seq)) if mask[t] != IGNORED]
            top = token_logprobs(teacher, seq).topk(self.config.top_k, dim=-1)
            group["distill_token_ids"].append([[]] + top.indices[1:].tolist())
            group["distill_logprobs"].append([[]] + top.values[1:].tolist())
            teacher_mass += top.values[1:].exp().sum(-1).tolist()
        self.group = group
        self.baseline = {
            "eval/reference_answer_logprob": sum(answer_logprob) / len(answer_logprob),
            "eval/teacher_topk_mass": sum(teacher_mass) / len(teacher_mass),
        }
        await self.evaluate()

    async def get_next_item(self):
        return 0

    async def collect_trajectories(self, item):
        return copy.deepcopy(self.group), []

    async def evaluate(self, *args, **kwargs):
        start = time.time()
        await self.evaluate_log(metrics=self.baseline, start_time=start, end_time=time.time())


if __name__ == "__main__":
    TeacherEnv.cli()
