"""Scoring one answer against its example's ground truth: verl's reward functions or the user's.

verl's ``default_compute_score`` picks a scorer by the example's ``data_source``;
``data.reward_fn=package.module:function`` replaces it. Either answer (a float or a
dict) is read as a :class:`Score`: the value, whether it is correct, and whether the
reply had the answer format the scorer looks for, so correctness and format are
logged apart.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

from atropos_verl.data.sources import Example
from atropos_verl.data.tasks import BadRow, task_for

RewardResult = Union[float, int, bool, dict]
RewardFn = Callable[[str, Any, dict], RewardResult]


@dataclass(frozen=True)
class Score:
    value: float
    correct: bool
    # The answer was where the scorer looks for it (GSM8K: "#### n", MATH: \boxed{}), right or wrong.
    formatted: bool


def load_reward_fn(spec: str) -> RewardFn:
    """``package.module:function`` imported; a bad path fails at start-up, not at the first score."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"reward_fn must be 'verl' or 'package.module:function', got {spec!r}")
    function = getattr(importlib.import_module(module_name), attr, None)
    if not callable(function):
        raise ValueError(f"reward_fn {spec!r}: {module_name} has no function {attr!r}")
    return function


def interpret(result: RewardResult, solution: str, formatted_check: Optional[Callable[[str], bool]]) -> Score:
    """A scorer's float or dict as a :class:`Score`.

    Correct: the dict's ``correct`` or ``acc``, else a score of at least 1 (verl's scorers
    give 1 to a correct answer). Formatted: the dict's ``formatted``, else whether its
    ``pred`` is a real prediction (verl's math_dapo reports ``[INVALID]``), else the data
    source's own format check, else correctness.
    """
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"a reward dict needs a 'score' key, got keys {sorted(result)}")
        value = float(result["score"])
        correct = bool(result.get("correct", result.get("acc", value >= 1.0)))
        if "formatted" in result:
            formatted = bool(result["formatted"])
        elif "pred" in result:
            formatted = result["pred"] not in (None, "", "[INVALID]")
        else:
            formatted = formatted_check(solution) if formatted_check else correct
    else:
        value = float(result)
        correct = value >= 1.0
        formatted = formatted_check(solution) if formatted_check else correct
    if not math.isfinite(value):
        raise ValueError(f"the scorer returned {value}")
    return Score(value, correct, formatted or correct)


class Scorer:
    """Scores one answer to one example with verl's reward functions or the user's."""

    def __init__(self, reward_fn: str, format_score: Optional[float] = None):
        self.reward_fn = reward_fn
        self.format_score = format_score
        self._user_fn = None if reward_fn == "verl" else load_reward_fn(reward_fn)
        self._verl_knows: dict[str, bool] = {}

    def check(self, example: Example) -> None:
        """Raise :class:`BadRow` for an example verl has no reward function for (its rows would all score 0)."""
        if self._user_fn is not None:
            return
        source = example.data_source
        if source not in self._verl_knows:
            from verl.utils.reward_score import default_compute_score

            try:
                default_compute_score(source, "", example.ground_truth, example.extra_info)
                self._verl_knows[source] = True
            except NotImplementedError:
                self._verl_knows[source] = False
            except Exception:  # it dispatched to a scorer, which disliked the empty answer: fine
                self._verl_knows[source] = True
        if not self._verl_knows[source]:
            if not source:
                raise BadRow("no scorer", "no data_source: set data_source, or reward_fn to a function of yours")
            raise BadRow(
                "no scorer", f"verl has no reward function for data_source {source!r}; set data_source or reward_fn"
            )

    def __call__(self, example: Example, solution: str) -> Score:
        if self._user_fn is not None:
            result = self._user_fn(solution, example.ground_truth, example.extra_info)
        else:
            from verl.utils.reward_score import default_compute_score

            result = default_compute_score(example.data_source, solution, example.ground_truth, example.extra_info)
        score = interpret(result, solution, task_for(example.data_source).formatted)
        if self.format_score is not None and score.formatted and not score.correct:
            return Score(self.format_score, False, True)
        return score
