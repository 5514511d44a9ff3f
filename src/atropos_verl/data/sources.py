"""Rows of a dataset turned into prompts with ground truths, in verl's format.

A source is a Hugging Face hub dataset name or a local ``.jsonl`` / ``.json`` /
``.parquet`` file, or a folder of them. Two kinds of rows are understood:

* verl rows: ``prompt`` is a list of chat messages and the answer sits in
  ``reward_model.ground_truth`` (what verl's preprocessing scripts and
  ``python -m atropos_verl.data.prepare`` write);
* plain rows: a question field and an answer field (``question`` / ``answer``,
  ``problem`` / ``solution``, ...), read as the row's task says
  (:mod:`atropos_verl.data.tasks`).

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

from atropos_verl.data.tasks import BadRow, task_for

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# File names that mark a folder as split into train/test/...: a folder using them must
# have a file for the requested split (evaluating on the training file would be silent).
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
PROMPT_FORMATS = ("chat", "plain")


def resolve_prompt_format(tokenizer: Any, prompt_format: str) -> str:
    """``auto``: the chat template when the tokenizer has one, else ``plain`` (e.g. DialoGPT, GPT-2)."""
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return prompt_format


class SourceError(ValueError):
    """A source cannot be read at all (no such file, no file for the split, unreadable file)."""


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
