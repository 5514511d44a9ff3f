"""Rows of a dataset turned into prompts with ground truths, in verl's format.

A source is a Hugging Face hub dataset name or a local ``.jsonl`` / ``.json`` /
``.parquet`` file, or a folder of them. Two kinds of rows are understood:

* verl rows: ``prompt`` is a list of chat messages and the answer sits in
  ``reward_model.ground_truth`` (what verl's preprocessing scripts and
  ``python -m atropos_verl.data.prepare`` write);
* plain rows: a question field and an answer field (``question`` / ``answer``,
  ``problem`` / ``solution``, ...). A :class:`Task`, chosen by the row's
  ``data_source``, says how to read the ground truth from the answer (the number
  after ``####`` for GSM8K, the last ``\\boxed{}`` for MATH, the label letter for
  HellaSwag) and which instruction to append to the question, as verl's own
  preprocessing does, so verl's scorers find the answer where they look for it.

Bad rows never stop a load: :func:`select` skips them and keeps a count per kind
and the first few reasons (:class:`SkipLog`). Nothing here needs a tokenizer
except :func:`render_prompt`, which the environment uses to filter long prompts.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# File names that mark a folder as split into train/test/...: a folder using them must
# have a file for the requested split (evaluating on the training file would be silent).
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
PROMPT_FORMATS = ("chat", "plain")


class SourceError(ValueError):
    """A source cannot be read at all (no such file, no file for the split, unreadable file)."""


class BadRow(ValueError):
    """One row cannot be used; ``kind`` groups reasons for the skip counts."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class UnreadableRow:
    """Stands in for a line of a JSONL file that does not parse, so it is counted like any bad row."""

    reason: str


@dataclass
class Example:
    """One usable prompt, in verl's terms."""

    prompt: list[dict[str, str]]
    ground_truth: Any
    data_source: str
    ability: str
    extra_info: dict[str, Any] = field(default_factory=dict)

    def to_verl_row(self) -> dict[str, Any]:
        return {
            "data_source": self.data_source,
            "prompt": self.prompt,
            "ability": self.ability,
            "reward_model": {"style": "rule", "ground_truth": self.ground_truth},
            "extra_info": self.extra_info,
        }


@dataclass(frozen=True)
class Fields:
    """How to read plain rows; ``None`` means the task's default (or the row's own value)."""

    prompt: Optional[str] = None
    answer: Optional[str] = None
    data_source: Optional[str] = None
    ability: Optional[str] = None
    # Appended to the question of plain rows; "" appends nothing.
    instruction: Optional[str] = None


# --- tasks: what a data source's plain rows look like ---------------------------------------


def _text(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow("bad ground truth", f"{what} is a {type(value).__name__}, not text")
    text = str(value).strip()
    if not text:
        raise BadRow("bad ground truth", f"{what} is empty")
    return text


_GSM8K_FINAL = re.compile(r"####\s*(-?[0-9][0-9.,]*)")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(\.[0-9]+)?")


def gsm8k_ground_truth(value: Any, field_name: str) -> str:
    """The number after ``####`` (commas dropped, as verl's scorer drops them from replies); a bare number as is."""
    text = _text(value, field_name)
    found = _GSM8K_FINAL.findall(text)
    if found:
        return found[-1].rstrip(".").replace(",", "")
    if _NUMBER.fullmatch(text):
        return text.replace(",", "")
    raise BadRow("bad ground truth", f"no '#### <number>' in {field_name}: {text[-60:]!r}")


def math_ground_truth(value: Any, field_name: str) -> str:
    """The last ``\\boxed{}`` of a worked solution (verl's MATH preprocessing); a short answer as is."""
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    text = _text(value, field_name)
    boxed = last_boxed_only_string(text)
    if boxed is not None:
        try:
            return remove_boxed(boxed).strip()
        except AssertionError:
            raise BadRow("bad ground truth", f"unbalanced \\boxed in {field_name}: {boxed[:60]!r}") from None
    if field_name == "solution":
        raise BadRow("bad ground truth", f"no \\boxed{{}} answer in {field_name}: {text[-60:]!r}")
    return text


CHOICE_LETTERS = "ABCDEFGH"


def choice_ground_truth(value: Any, field_name: str) -> str:
    """A choice index (0-based, int or digit string) as its letter; a letter as is."""
    text = _text(value, field_name)
    if text.isdigit() and int(text) < len(CHOICE_LETTERS):
        return CHOICE_LETTERS[int(text)]
    if len(text) == 1 and text.upper() in CHOICE_LETTERS:
        return text.upper()
    raise BadRow("bad ground truth", f"{field_name} {text!r} is not a choice index or letter")


def plain_ground_truth(value: Any, field_name: str) -> str:
    return _text(value, field_name)


def _field_text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise BadRow("missing field", f"{name} is {type(value).__name__}, not text")
    return value.strip()


def plain_question(row: dict[str, Any], field_name: str) -> str:
    return _field_text(row, field_name)


_BRACKETED = re.compile(r"\[[^\]]*\]")


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry markup such as "[header]" / "[title]"; drop it and the doubled spaces it leaves.
    return " ".join(_BRACKETED.sub(" ", text).split())


def hellaswag_question(row: dict[str, Any], field_name: str) -> str:
    context = _clean_hellaswag(_field_text(row, field_name))
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise BadRow("missing field", "endings is not a list of at least two strings")
    if len(endings) > len(CHOICE_LETTERS):
        raise BadRow("missing field", f"{len(endings)} endings, at most {len(CHOICE_LETTERS)} supported")
    label = row.get("activity_label")
    head = f"{_clean_hellaswag(label)}: {context}" if isinstance(label, str) and label.strip() else context
    options = "\n".join(f"{CHOICE_LETTERS[i]}. {_clean_hellaswag(e)}" for i, e in enumerate(endings))
    return f"{head}\n\nWhich ending is the most plausible?\n{options}"


_ANSWER_LETTER = re.compile(r"(?i:answer)\s*(?:is)?\s*[:=]?\s*\(?([A-H])\b")


def multiple_choice_score(solution_str: str, ground_truth: str, extra_info: Optional[dict] = None) -> dict[str, Any]:
    """Reward for a lettered multiple-choice answer: the last ``Answer: X`` in the reply decides.

    verl has no scorer for HellaSwag; this one reports format and correctness separately.
    """
    found = _ANSWER_LETTER.findall(solution_str[-300:])
    pred = found[-1].upper() if found else None
    correct = pred is not None and pred == str(ground_truth).strip().upper()
    return {"score": 1.0 if correct else 0.0, "correct": correct, "formatted": pred is not None, "pred": pred}


def _gsm8k_formatted(solution: str) -> bool:
    from verl.utils.reward_score.gsm8k import extract_solution

    return extract_solution(solution, method="strict") is not None


def _boxed_formatted(solution: str) -> bool:
    from verl.utils.reward_score.math_reward import last_boxed_only_string

    return last_boxed_only_string(solution) is not None


@dataclass(frozen=True)
class Task:
    """How one kind of dataset's plain rows become prompts, and where its hub copy lives."""

    name: str
    data_source: str
    ability: str
    prompt_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]
    instruction: str
    ground_truth: Callable[[Any, str], Any]
    question: Callable[[dict[str, Any], str], str] = plain_question
    # Whether a reply has the answer format the scorer looks for, for scorers that only
    # return a number (verl's gsm8k gives 0 to a wrong answer and to no answer alike).
    formatted: Optional[Callable[[str], bool]] = None
    hub_path: Optional[str] = None
    hub_subset: Optional[str] = None
    # Other data_source names verl scores the same way.
    aliases: tuple[str, ...] = ()


GSM8K = Task(
    name="gsm8k",
    data_source="openai/gsm8k",
    ability="math",
    prompt_fields=("question",),
    answer_fields=("answer",),
    # verl's GSM8K preprocessing asks for this; its strict scorer only reads "#### <number>".
    instruction='Let\'s think step by step and output the final answer after "####".',
    ground_truth=gsm8k_ground_truth,
    formatted=_gsm8k_formatted,
    hub_path="openai/gsm8k",
    hub_subset="main",
)
MATH = Task(
    name="math",
    data_source="DigitalLearningGmbH/MATH-lighteval",
    ability="math",
    prompt_fields=("problem", "question"),
    answer_fields=("answer", "solution"),
    instruction="Let's think step by step and output the final answer within \\boxed{}.",
    ground_truth=math_ground_truth,
    formatted=_boxed_formatted,
    hub_path="DigitalLearningGmbH/MATH-lighteval",
    aliases=("lighteval/MATH", "HuggingFaceH4/MATH-500"),
)
HELLASWAG = Task(
    name="hellaswag",
    data_source="Rowan/hellaswag",
    ability="commonsense",
    prompt_fields=("ctx",),
    answer_fields=("label",),
    instruction='Reply with the letter of the most plausible ending in the form "Answer: X".',
    ground_truth=choice_ground_truth,
    question=hellaswag_question,
    hub_path="Rowan/hellaswag",
)
GENERIC = Task(
    name="generic",
    data_source="",
    ability="",
    prompt_fields=("prompt", "question", "problem", "query", "instruction", "input"),
    answer_fields=("ground_truth", "answer", "solution", "target", "output", "label"),
    instruction="",
    ground_truth=plain_ground_truth,
)
TASKS: dict[str, Task] = {task.name: task for task in (GSM8K, MATH, HELLASWAG)}
_TASK_BY_SOURCE: dict[str, Task] = {ds: t for t in TASKS.values() for ds in (t.data_source, *t.aliases)}


def task_for(data_source: Optional[str]) -> Task:
    return _TASK_BY_SOURCE.get(data_source or "", GENERIC)


# --- normalising one row --------------------------------------------------------------------


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow("empty prompt", "prompt is not a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRow("missing field", f"prompt[{i}] is not a {{role, content}} message")
        content = message.get("content")
        if not isinstance(content, str):
            raise BadRow("missing field", f"prompt[{i}].content is {type(content).__name__}, not text")
        messages.append({"role": message["role"], "content": content})
    if not any(m["content"].strip() for m in messages):
        raise BadRow("empty prompt", "every message of prompt is empty")
    return messages


def _first_present(row: dict[str, Any], names: Sequence[str], what: str) -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return name
    raise BadRow("missing field", f"no {what} field (looked for {', '.join(names)})")


def _verl_ground_truth(row: dict[str, Any]) -> Any:
    reward_model = row.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if truth is None or (isinstance(truth, str) and not truth.strip()):
        raise BadRow("bad ground truth", "reward_model.ground_truth is missing or empty")
    return truth


def normalize(raw: Any, index: int, fields: Fields = Fields()) -> Example:
    """One source row as an :class:`Example`; raises :class:`BadRow` saying why it cannot be used."""
    if isinstance(raw, UnreadableRow):
        raise BadRow("unreadable", raw.reason)
    if not isinstance(raw, dict):
        raise BadRow("unreadable", f"row is a {type(raw).__name__}, not an object")
    row_source = raw.get("data_source")
    data_source = fields.data_source or (row_source if isinstance(row_source, str) else "") or ""
    task = task_for(data_source)
    data_source = data_source or task.data_source
    row_ability = raw.get("ability")
    ability = fields.ability or (row_ability if isinstance(row_ability, str) else "") or task.ability
    extra_info = dict(raw["extra_info"]) if isinstance(raw.get("extra_info"), dict) else {}

    if fields.prompt is None and isinstance(raw.get("prompt"), list):
        # A verl row: its prompt is final (its instruction is already in it).
        prompt = _messages(raw["prompt"])
        if fields.answer is not None:
            truth = task.ground_truth(raw.get(fields.answer), fields.answer)
        else:
            truth = _verl_ground_truth(raw)
        return Example(prompt, truth, data_source, ability, extra_info)

    prompt_field = fields.prompt or _first_present(raw, task.prompt_fields, "prompt")
    if isinstance(raw.get(prompt_field), list):
        prompt = _messages(raw[prompt_field])
    else:
        question = task.question(raw, prompt_field)
        if not question:
            raise BadRow("empty prompt", f"{prompt_field} is empty")
        instruction = task.instruction if fields.instruction is None else fields.instruction
        # One space, as verl's GSM8K/MATH preprocessing joins them; a question laid out in lines gets its own line.
        joiner = "\n\n" if "\n" in question else " "
        prompt = [{"role": "user", "content": f"{question}{joiner}{instruction}" if instruction else question}]
        extra_info.setdefault("question", question)
    if fields.answer is None and isinstance(raw.get("reward_model"), dict):
        truth = _verl_ground_truth(raw)
    else:
        answer_field = fields.answer or _first_present(raw, task.answer_fields, "answer")
        truth = task.ground_truth(raw.get(answer_field), answer_field)
        # The worked answer, for whoever reads the samples later (verl's preprocessing keeps it too).
        extra_info.setdefault("answer", str(raw.get(answer_field)))
    extra_info.setdefault("index", index)
    return Example(prompt, truth, data_source, ability, extra_info)


# --- rendering prompts for the policy -------------------------------------------------------


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the policy sees it: the messages (system prompt included), the text and its token ids."""

    messages: list[dict[str, str]]
    text: str
    token_ids: list[int]


def render_prompt(
    tokenizer: Any, messages: list[dict[str, str]], prompt_format: str, system_prompt: Optional[str] = None
) -> RenderedPrompt:
    """``chat``: the tokenizer's chat template with the generation prompt.

    ``plain``: the contents, blank-line separated.

    ``token_ids`` are what ``tokenizer.encode(text)`` gives, which is how atroposlib's
    ``ManagedServer`` and an OpenAI completions server tokenize the text we send.
    """
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if prompt_format == "chat":
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer.encode("", add_special_tokens=True):
            # The template writes BOS and encode() adds another: send the text without it.
            text = text[len(bos) :]
    elif prompt_format == "plain":
        text = "\n\n".join(m["content"] for m in messages)
    else:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    return RenderedPrompt(messages, text, list(tokenizer.encode(text, add_special_tokens=True)))


# --- reading sources ------------------------------------------------------------------------


def is_local(source: str) -> bool:
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.endswith(DATA_SUFFIXES)


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise SourceError(f"{folder} holds no {'/'.join(DATA_SUFFIXES)} files")

    def split_of(path: Path) -> str:
        return re.split(r"[-_.]", path.name, maxsplit=1)[0].lower()

    matching = [p for p in files if split_of(p) == split.lower()]
    if matching:
        return matching
    named = sorted({split_of(p) for p in files if split_of(p) in _SPLIT_NAMES})
    if named:
        raise SourceError(f"{folder} has no file for split {split!r} (it has splits {', '.join(named)})")
    return files


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield UnreadableRow(f"{path.name} line {number}: invalid JSON ({exc.msg})")


def _read_file(path: Path) -> list[Any]:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise SourceError(f"cannot read parquet file {path}: {exc}") from exc
    if path.name.endswith(".json"):
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # Many ".json" files are JSON Lines.
            return list(_read_jsonl(path))
        if not isinstance(data, list):
            raise SourceError(f"{path} must hold a list of row objects (or JSON Lines), got a {type(data).__name__}")
        return data
    return list(_read_jsonl(path))


def load_rows(source: str, split: str = "train", subset: Optional[str] = None) -> Sequence[Any]:
    """The raw rows of a local file or folder (``split`` picks ``<split>*`` files in a folder), or of a hub dataset.

    A single local file is the split itself; ``subset`` is the hub dataset's config name.
    """
    if not source:
        raise SourceError("no source given: name a hub dataset or a .jsonl/.json/.parquet file or folder")
    if is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise SourceError(f"no such file or folder: {source}")
        files = _split_files(path, split) if path.is_dir() else [path]
        rows: list[Any] = []
        for file in files:
            rows.extend(_read_file(file))
        logger.debug("read %d rows from %s", len(rows), ", ".join(str(f) for f in files))
        return rows
    import datasets

    try:
        return datasets.load_dataset(source, subset or None, split=split)
    except Exception as exc:  # the hub client raises many types; the message is what matters
        raise SourceError(f"cannot load hub dataset {source!r} (subset {subset!r}, split {split!r}): {exc}") from exc


# --- selecting usable rows ------------------------------------------------------------------


@dataclass
class SkipLog:
    """Rows skipped, counted by kind, with the first few reasons kept for the log."""

    keep_reasons: int = 5
    counts: Counter = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, index: int, bad: BadRow) -> None:
        self.counts[bad.kind] += 1
        if len(self.first) < self.keep_reasons:
            self.first.append(f"row {index}: {bad}")

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 rows"
        kinds = ", ".join(f"{kind} {n}" for kind, n in self.counts.most_common())
        return f"skipped {self.total} rows ({kinds}); first reasons: " + "; ".join(self.first)


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


T = TypeVar("T")


def select(
    rows: Sequence[Any],
    check: Callable[[Any, int], T],
    *,
    limit: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[list[T], SkipLog]:
    """What ``check`` makes of the rows it accepts (it raises :class:`BadRow` for the others), in
    (seeded) shuffled or file order, at most ``limit`` of them (0: all).

    Rows are checked lazily, so a small ``limit`` on a large hub dataset reads few rows.
    """
    skipped = SkipLog()
    examples: list[T] = []
    order = shuffled(len(rows), seed) if shuffle else range(len(rows))
    for index in order:
        try:
            examples.append(check(rows[index], index))
        except BadRow as bad:
            skipped.add(index, bad)
            continue
        if limit and len(examples) >= limit:
            break
    return examples, skipped
