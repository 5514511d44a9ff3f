"""The built-in arithmetic environment's reward and question stream (pure functions, no servers)."""

import random

import pytest

from atropos_verl.envs.arithmetic import make_problem, score_reply, solve


@pytest.mark.parametrize("reply", ["12", " 12\n", "12.", "7 + 5 = 12", "The answer is 12."])
def test_a_short_correct_reply_scores_one(reply):
    assert score_reply(reply, 12) == 1.0


def test_a_correct_result_in_a_long_reply_gets_partial_credit():
    reply = "If you add seven and five together you get 12"
    assert score_reply(reply, 12) == 0.25
    assert score_reply(reply, 12, partial_credit=0.5) == 0.5
    assert score_reply(reply, 12, max_words=10) == 1.0


def test_max_words_one_demands_the_bare_number():
    assert score_reply("12", 12, max_words=1) == 1.0
    assert score_reply("7 + 5 = 12", 12, max_words=1) == 0.25


@pytest.mark.parametrize("reply", ["13", "12 is wrong, it is 13", "twelve", "", "7 + 5"])
def test_a_wrong_or_missing_result_scores_zero(reply):
    assert score_reply(reply, 12) == 0.0


def test_a_reply_cut_off_at_the_token_limit_scores_zero():
    assert score_reply("12", 12, finished=False) == 0.0


def test_negative_results():
    assert score_reply("-3", -3) == 1.0
    assert score_reply("3", -3) == 0.0


def test_questions_are_a_deterministic_stream_within_bounds():
    def draw(seed):
        rng = random.Random(seed)
        return [make_problem(rng, 0, 9, "+-*") for _ in range(200)]

    first = draw(7)
    assert draw(7) == first and draw(8) != first
    assert {op for _, op, _ in first} == {"+", "-", "*"}
    for a, op, b in first:
        assert 0 <= a <= 9 and 0 <= b <= 9
        assert solve(a, op, b) >= 0  # subtraction is ordered so the result is never negative
    assert solve(7, "+", 5) == 12 and solve(7, "-", 5) == 2 and solve(7, "*", 5) == 35
