"""What each known dataset's plain rows look like: where the answer is, what to ask, what verl scores.

A :class:`Task`, chosen by a row's ``data_source``, says how to read the ground truth
from the answer (the number after ``####`` for GSM8K, the last ``\\boxed{}`` for MATH,
the label letter for HellaSwag) and which instruction to append to the question, as
verl's own preprocessing does, so verl's scorers find the answer where they look for it.
Reading rows from files or the hub is :mod:`atropos_verl.data.sources`' job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional


class BadRow(ValueError):
    """One row cannot be used; ``kind`` groups reasons for the skip counts."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


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
