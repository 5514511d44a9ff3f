"""Any dataset of prompts with ground truths as an Atropos environment, scored by verl's reward functions.

The source is a Hugging Face hub dataset or local ``.jsonl`` / ``.json`` /
``.parquet`` files (verl-format rows or plain question/answer rows; see
:mod:`atropos_verl.data.sources`). Each item is one prompt; the policy answers it
``group_size`` times and every answer is scored by verl's ``default_compute_score``
for the row's ``data_source`` (``reward_fn verl``) or by a function of the user's
(``reward_fn package.module:function``, called as ``fn(solution_str, ground_truth,
extra_info)`` and returning a float or a dict with ``score``).

Each group also reports the fraction of answers that were correct and the fraction
that had the answer format the scorer reads (``group_overrides["metrics"]``), since
verl's GSM8K scorer, for one, gives a wrong answer and no answer the same 0.
Unusable rows (missing fields, empty prompts, prompts over ``max_prompt_length``
tokens, ground truths that do not parse, data sources verl cannot score) are
skipped at start-up and counted in the log with the first few reasons.

It is a real ``atroposlib`` ``BaseEnv``: with ``--openai.server_type vllm`` (or
``sglang``) it samples through ``ManagedServer`` and sends exact tokens, masks and
the sampler's log-probs; with ``openai`` it uses chat completions (or completions
for ``prompt_format plain``) and tokenizes the text itself. The trainer starts it
from ``atropos_verl/conf/data/{gsm8k,math,hellaswag,parquet,jsonl}.yaml``; on its own::

    python -m atropos_verl.envs.dataset serve --env.source train.parquet \\
        --env.rollout_server_url API --env.tokenizer_name MODEL --openai.base_url GATEWAY/v1 \\
        --openai.model_name NAME --openai.server_type vllm --openai.api_key unused
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

from atroposlib.envs.base import BaseEnv, BaseEnvConfig
from pydantic import Field, field_validator

from atropos_verl.data.scoring import Score, Scorer
from atropos_verl.data.sources import (
    Example,
    Fields,
    RenderedPrompt,
    SourceError,
    load_rows,
    normalize,
    render_prompt,
    resolve_prompt_format,
    select,
    shuffled,
)
from atropos_verl.data.tasks import BadRow
from atropos_verl.envs.sampling import (
    IGNORED,
    Sample,
    placeholder_server,
    returns_text_only,
    sample_chat_text,
    sample_managed,
    scored_group,
    supervised_env_defaults,
)

logger = logging.getLogger(__name__)

# Scoring failures logged one by one before the log only counts them.
_LOGGED_FAILURES = 3


class DatasetEnvConfig(BaseEnvConfig):
    source: str = Field(
        default="", description="Hugging Face hub dataset name, or a local .jsonl/.json/.parquet file or folder of them"
    )
    subset: Optional[str] = Field(
        default=None, description="Hub dataset config name (openai/gsm8k: main); local files ignore it"
    )
    split: str = Field(default="train", description="Hub split, or in a folder the files named <split>*")
    prompt_field: Optional[str] = Field(
        default=None,
        description="Field holding the question or the chat messages (default: prompt, question, problem, ...)",
    )
    answer_field: Optional[str] = Field(
        default=None,
        description="Field holding the answer "
        "(default: reward_model.ground_truth, then ground_truth, answer, solution, ...)",
    )
    data_source: Optional[str] = Field(
        default=None,
        description="verl data_source for every row (picks verl's scorer and how plain answers are read, "
        "e.g. openai/gsm8k); default: each row's own data_source",
    )
    ability: Optional[str] = Field(default=None, description="verl ability for every row (default: the row's own)")
    instruction: Optional[str] = Field(
        default=None,
        description="Appended to the question of plain rows (default: the data source's, e.g. GSM8K's "
        "'... output the final answer after \"####\".'); empty for none",
    )
    max_prompts: int = Field(default=0, ge=0, description="Use at most this many prompts (0: all)")
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        default="auto",
        description="chat: the tokenizer's chat template; plain: the message text as is; "
        "auto: chat when the tokenizer has a template, else plain",
    )
    system_prompt: Optional[str] = Field(default=None, description="System message put before prompts that have none")
    max_prompt_length: int = Field(
        default=1024, ge=0, description="Skip prompts longer than this many tokens (0: no limit)"
    )
    max_response_length: int = Field(default=1024, ge=1, description="Tokens sampled per answer at most")
    shuffle: bool = Field(default=True, description="Visit prompts in a seeded random order, reshuffled every epoch")
    seed: int = Field(default=0, description="Seed of the prompt order")
    temperature: float = Field(default=1.0, ge=0.0, description="Sampling temperature")
    reward_fn: str = Field(
        default="verl",
        description="verl: verl's default_compute_score by each row's data_source; or package.module:function "
        "called as fn(solution_str, ground_truth, extra_info) -> float | dict with 'score' "
        "(and optionally 'correct', 'formatted')",
    )
    format_score: Optional[float] = Field(
        default=None, description="Score of an answer in the right format but wrong (default: the scorer's own)"
    )
    eval_source: Optional[str] = Field(
        default=None, description="Held-out data scored greedily every steps_per_eval steps (hub name or local path)"
    )
    eval_split: str = Field(default="test", description="Split of eval_source")
    eval_max_prompts: int = Field(default=0, ge=0, description="Evaluate on at most this many prompts (0: all)")

    @field_validator(
        "subset",
        "prompt_field",
        "answer_field",
        "data_source",
        "ability",
        "system_prompt",
        "eval_source",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # The trainer's configs pass unset values as "" (a null cannot sit in a list of arguments).
        return None if value == "" else value


@dataclass(frozen=True)
class Prompt:
    example: Example
    rendered: RenderedPrompt


@dataclass
class Tally:
    answers: int = 0
    correct: int = 0
    formatted: int = 0
    score_sum: float = 0.0

    def add(self, scores: list[Score]) -> None:
        self.answers += len(scores)
        self.correct += sum(s.correct for s in scores)
        self.formatted += sum(s.formatted for s in scores)
        self.score_sum += sum(s.value for s in scores)

    def means(self) -> dict[str, float]:
        n = max(self.answers, 1)
        return {"correct": self.correct / n, "formatted": self.formatted / n, "score": self.score_sum / n}


class DatasetEnv(BaseEnv):
    name = "dataset"
    env_config_cls = DatasetEnvConfig

    @classmethod
    def config_init(cls):
        config = DatasetEnvConfig(
            **supervised_env_defaults(cls.name),
            group_size=8,
            max_batches_offpolicy=1,
            steps_per_eval=20,
            # Groups that all score the same are kept: they train nothing under GRPO, but dropping
            # them starves the trainer on data the policy cannot solve yet and biases the metrics.
            ensure_scores_are_not_same=False,
        )
        return config, placeholder_server()

    async def setup(self):
        cfg: DatasetEnvConfig = self.config
        cfg.prompt_format = resolve_prompt_format(self.tokenizer, cfg.prompt_format)
        if cfg.prompt_format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {cfg.tokenizer_name} has no chat template: use --env.prompt_format plain")
        self.scorer = Scorer(cfg.reward_fn, cfg.format_score)
        self.fields = Fields(cfg.prompt_field, cfg.answer_field, cfg.data_source, cfg.ability, cfg.instruction)
        self.prompts = await asyncio.to_thread(self._load, cfg.source, cfg.split, cfg.max_prompts, "train")
        self.eval_prompts: list[Prompt] = []
        if cfg.eval_source:
            self.eval_prompts = await asyncio.to_thread(
                self._load, cfg.eval_source, cfg.eval_split, cfg.eval_max_prompts, "eval"
            )
        else:
            # BaseEnv pauses training for every evaluation; with nothing to evaluate, never pause.
            cfg.steps_per_eval = 0
        self.served = 0
        self.order = list(range(len(self.prompts)))
        self.total, self.recent = Tally(), Tally()
        self.groups_scored = 0
        self.scoring_failures = 0
        self.pending_eval_metrics: dict[str, float] = {}

    def _load(self, source: str, split: str, limit: int, label: str) -> list[Prompt]:
        cfg: DatasetEnvConfig = self.config
        rows = load_rows(source, split, cfg.subset)

        def check(raw: Any, index: int) -> Prompt:
            example = normalize(raw, index, self.fields)
            self.scorer.check(example)
            try:
                rendered = render_prompt(self.tokenizer, example.prompt, cfg.prompt_format, cfg.system_prompt)
            except Exception as exc:  # chat templates raise anything (e.g. on roles out of order)
                raise BadRow("bad prompt", f"cannot render: {exc}") from None
            if cfg.max_prompt_length and len(rendered.token_ids) > cfg.max_prompt_length:
                raise BadRow(
                    "prompt too long", f"{len(rendered.token_ids)} tokens > max_prompt_length {cfg.max_prompt_length}"
                )
            return Prompt(example, rendered)

        prompts, skipped = select(rows, check, limit=limit, shuffle=cfg.shuffle, seed=cfg.seed)
        examined = len(prompts) + skipped.total
        logger.info(
            "%s data %s (split %s): %d prompts from %d of its %d rows; %s",
            label, source, split, len(prompts), examined, len(rows), skipped.summary(),
        )  # fmt: skip
        if not prompts:
            raise SourceError(f"no usable {label} prompts in {source} (split {split}): {skipped.summary()}")
        return prompts

    async def get_next_item(self) -> int:
        epoch, position = divmod(self.served, len(self.prompts))
        if position == 0 and epoch > 0:
            logger.info("epoch %d over %d prompts", epoch + 1, len(self.prompts))
            if self.config.shuffle:
                self.order = shuffled(len(self.prompts), self.config.seed + epoch)
        self.served += 1
        return self.order[position]

    async def collect_trajectories(self, item: int):
        prompt = self.prompts[item]
        samples = await self._sample(prompt.rendered, self.config.group_size, self.config.temperature)
        scores = [self._score(prompt.example, sample.text) for sample in samples]
        group = scored_group(samples, [s.value for s in scores], self.config.temperature)
        n = max(len(scores), 1)
        group["group_overrides"] = {
            "metrics": {
                "correct": sum(s.correct for s in scores) / n,
                "formatted": sum(s.formatted for s in scores) / n,
            }
        }
        self.total.add(scores)
        self.recent.add(scores)
        self.groups_scored += 1
        return group, []

    def _score(self, example: Example, text: str) -> Score:
        try:
            return self.scorer(example, text)
        except Exception as exc:  # a scorer failing on one odd answer must not lose the group
            self.scoring_failures += 1
            if self.scoring_failures <= _LOGGED_FAILURES:
                logger.warning("scoring failed (%d so far; the answer scores 0): %r", self.scoring_failures, exc)
            return Score(0.0, False, False)

    async def _sample(self, prompt: RenderedPrompt, n: int, temperature: float) -> list[Sample]:
        max_tokens = self.config.max_response_length
        if not returns_text_only(self):
            return await sample_managed(self, prompt.text, n, max_tokens, temperature)
        if self.config.prompt_format == "chat":
            return await sample_chat_text(self, prompt.messages, n, max_tokens, temperature)
        # Plain completions return text only: the rendered prompt's ids plus the answer's.
        completion = await self.server.completion(
            prompt=prompt.text, n=n, max_tokens=max_tokens, temperature=temperature
        )
        eos = self.tokenizer.eos_token_id
        samples = []
        for choice in completion.choices:
            answer = list(self.tokenizer.encode(choice.text, add_special_tokens=False))
            if choice.finish_reason == "stop" and eos is not None:
                # The server stopped on EOS and left it out of the text; the policy did sample it.
                answer.append(eos)
            tokens = prompt.token_ids + answer
            samples.append(
                Sample(tokens, [IGNORED] * len(prompt.token_ids) + answer, None, choice.text, choice.finish_reason)
            )
        return samples

    async def evaluate(self, *args, **kwargs):
        if not self.eval_prompts:
            return
        started = time.time()
        limit = asyncio.Semaphore(max(1, self.config.max_eval_workers))

        async def answer(prompt: Prompt) -> tuple[Prompt, Sample, Score]:
            async with limit:
                sample = (await self._sample(prompt.rendered, 1, 0.0))[0]
            return prompt, sample, self._score(prompt.example, sample.text)

        results = await asyncio.gather(*(answer(p) for p in self.eval_prompts), return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            logger.warning("eval: %d of %d requests failed; first: %r", len(failures), len(results), failures[0])
        if not done:
            return
        tally = Tally()
        tally.add([score for _, _, score in done])
        metrics = {f"eval/{key}": value for key, value in tally.means().items()}
        metrics["eval/prompts"] = float(len(done))
        logger.info(
            "eval at step %d on %d prompts (greedy): correct %.3f, formatted %.3f, mean score %.3f (%.1fs)",
            self.curr_step, len(done), metrics["eval/correct"], metrics["eval/formatted"], metrics["eval/score"],
            time.time() - started,
        )  # fmt: skip
        self.pending_eval_metrics.update(metrics)
        samples = [
            {
                "prompt": p.rendered.text,
                "response": s.text,
                "ground_truth": p.example.ground_truth,
                "data_source": p.example.data_source,
                "score": sc.value,
                "correct": sc.correct,
                "formatted": sc.formatted,
                "finish_reason": s.finish_reason,
            }
            for p, s, sc in done
        ]
        await self.evaluate_log(
            metrics,
            start_time=started,
            end_time=time.time(),
            generation_parameters={"temperature": 0.0, "max_tokens": self.config.max_response_length},
            samples=samples,
        )

    async def wandb_log(self, wandb_metrics: Optional[dict] = None):
        metrics = dict(wandb_metrics or {})
        if self.recent.answers:
            recent, total = self.recent.means(), self.total.means()
            metrics.update({f"train/{key}": value for key, value in recent.items()})
            logger.info(
                "step %d: %d groups scored; correct %.3f (running %.3f), formatted %.3f (running %.3f), "
                "mean score %.3f (running %.3f)%s",
                self.curr_step, self.groups_scored, recent["correct"], total["correct"], recent["formatted"],
                total["formatted"], recent["score"], total["score"],
                f"; {self.scoring_failures} scoring failures" if self.scoring_failures else "",
            )  # fmt: skip
            self.recent = Tally()
        metrics.update(self.pending_eval_metrics)
        self.pending_eval_metrics = {}
        await super().wandb_log(metrics)


def _log_to_stderr(*loggers: logging.Logger) -> None:
    """Our INFO lines (data summary, running means, evals) in the env's log, without atroposlib's chatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for each in loggers:
        each.addHandler(handler)
        each.setLevel(logging.INFO)
        each.propagate = False


if __name__ == "__main__":
    # Run as a module, this file's logger is "__main__", outside the package's.
    _log_to_stderr(logging.getLogger("atropos_verl"), logger)
    DatasetEnv.cli()
