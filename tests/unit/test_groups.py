"""Validation of raw scored groups: every bad field is rejected with a reason naming it."""

import copy
import math

import pytest

from atropos_verl.groups import GroupLimits, GroupRejected, describe, parse_group, validate_batch

LIMITS = GroupLimits(vocab_size=100, max_token_len=16)


def good_group():
    return {
        "tokens": [[1, 2, 3, 4, 5], [1, 2, 6, 7]],
        "masks": [[-100, -100, 3, -100, 5], [-100, 2, 6, 7]],
        "scores": [1.0, 0.0],
        "advantages": [],
        "ref_logprobs": [],
        "messages": [],
        "overrides": [],
        "group_overrides": {},
        "images": [],
        "env_id": 3,
    }


def rejected(raw):
    with pytest.raises(GroupRejected) as info:
        parse_group(raw, "g", LIMITS)
    return info.value


def test_accepts_a_good_group_and_treats_empty_lists_as_absent():
    group = parse_group(good_group(), "g", LIMITS)
    assert group.size == 2
    assert group.env_id == 3
    assert group.advantages is None
    assert group.inference_logprobs is None
    assert group.temperatures == [1.0, 1.0]
    assert group.zero_advantage == [False, False]


def test_reads_overrides_and_temperatures():
    raw = good_group()
    raw["overrides"] = [{"set_advantage_to_zero": True, "temperature": 0.5}, None]
    raw["generation_params"] = {"temperature": 0.8}
    group = parse_group(raw, "g", LIMITS)
    assert group.zero_advantage == [True, False]
    assert group.temperatures == [0.5, 0.8]


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda g: g.pop("masks"), "masks", "Field required"),
        (lambda g: g.update(tokens="abc"), "tokens", "list"),
        (lambda g: g.update(tokens=[]), "tokens", "no sequences"),
        (lambda g: g["masks"].pop(), "masks", "1 sequences but tokens has 2"),
        (lambda g: g["masks"][1].pop(), "masks[1]", "length 3 != tokens[1] length 4"),
        (lambda g: g.update(scores=[1.0]), "scores", "1 scores for 2 sequences"),
        (lambda g: g["scores"].__setitem__(1, math.nan), "scores[1]", "not finite"),
        (lambda g: g["scores"].__setitem__(0, math.inf), "scores[0]", "not finite"),
        (lambda g: g["tokens"][0].__setitem__(2, 100), "tokens[0]", "token id 100 outside the vocabulary [0, 100)"),
        (lambda g: g["tokens"][1].__setitem__(0, -7), "tokens[1]", "token id -7"),
        (
            lambda g: g["tokens"][0].extend(range(20)) or g["masks"][0].extend(range(20)),
            "tokens[0]",
            "exceeds max_token_len 16",
        ),
        (lambda g: g["tokens"].__setitem__(1, [5]) or g["masks"].__setitem__(1, [5]), "tokens[1]", "at least 2 tokens"),
        (lambda g: g.update(masks=[[-100] * 5, [5, -100, -100, -100]]), "masks", "nothing to train"),
        (lambda g: g.update(advantages=[[1.0] * 5]), "advantages", "1 sequences but tokens has 2"),
        (lambda g: g.update(advantages=[[1.0] * 5, [1.0] * 3]), "advantages[1]", "length 3 != tokens[1] length 4"),
        (lambda g: g.update(advantages=[[1.0] * 5, [1.0, math.nan, 1.0, 1.0]]), "advantages[1][1]", "not finite"),
        (lambda g: g.update(inference_logprobs=[[0.0] * 5, [0.0] * 5]), "inference_logprobs[1]", "length 5"),
        (lambda g: g.update(overrides=[{}]), "overrides", "1 entries for 2 sequences"),
        (lambda g: g.update(overrides=[{"temperature": 0}, {}]), "overrides[0].temperature", "> 0"),
        (lambda g: g.update(generation_params={"temperature": "hot"}), "generation_params.temperature", "not a number"),
    ],
)
def test_rejects_bad_fields_with_field_and_reason(mutate, field, reason):
    raw = copy.deepcopy(good_group())
    mutate(raw)
    error = rejected(raw)
    assert error.field == field
    assert reason in error.reason
    assert str(error).startswith("group g: ")


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda g: g.update(scores=[10**400, 0.0]), "scores.0", "valid number"),
        (lambda g: g.update(scores=[1e308, -1e308]), "scores[0]", "outside [-1e+06, 1e+06]"),
        (lambda g: g.update(tokens=[["1", 2, 3, 4, 5], [1, 2, 6, 7]]), "tokens.0.0", "valid integer"),
        (lambda g: g.update(overrides=[{"sft": "false"}, {}]), "overrides[0].sft", "true or false, got 'false'"),
        (
            lambda g: g.update(overrides=[{}, {"set_advantage_to_zero": 1}]),
            "overrides[1].set_advantage_to_zero",
            "true",
        ),
        (lambda g: g.update(overrides=[{"temperature": 10**401}, {}]), "overrides[0].temperature", "402-digit"),
        (lambda g: g.update(generation_params={"temperature": 1e-50}), "generation_params.temperature", "outside"),
        (lambda g: g.update(generation_params={"temperature": True}), "generation_params.temperature", "not a number"),
        (
            lambda g: g.update(inference_logprobs=[[1.0, 1.0, 0.5, 1.0, -1.0], [1.0] + [-1.0] * 3]),
            "inference_logprobs[0][2]",
            "0.5 outside [-10000, 0]",
        ),
        (
            lambda g: g.update(inference_logprobs=[[1.0, 1.0, -1e39, 1.0, -1.0], [1.0] + [-1.0] * 3]),
            "inference_logprobs[0][2]",
            "outside",
        ),
        (lambda g: g.update(advantages=[[1e7] * 5, [0.0] * 4]), "advantages[0][0]", "outside [-1e+06, 1e+06]"),
    ],
)
def test_values_that_would_crash_or_poison_a_batch_are_rejected(mutate, field, reason):
    raw = copy.deepcopy(good_group())
    mutate(raw)
    error = rejected(raw)
    assert error.field == field
    assert reason in error.reason


def test_masked_positions_may_carry_the_logprob_placeholder():
    raw = good_group()
    raw["inference_logprobs"] = [[1.0, 1.0, -0.5, 1.0, -0.2], [1.0, -0.1, -0.3, -0.4]]
    assert parse_group(raw, "g", LIMITS).inference_logprobs is not None


def test_validate_batch_turns_any_failure_into_a_named_rejection(monkeypatch):
    # A bug in a check of ours stands in for any input nobody foresaw.
    from atropos_verl import groups

    real = groups._temperature

    def buggy(raw, override, i, group_id):
        if override.get("temperature") == 0.25:
            raise RuntimeError("boom")
        return real(raw, override, i, group_id)

    monkeypatch.setattr(groups, "_temperature", buggy)
    odd = good_group()
    odd["overrides"] = [{"temperature": 0.25}, {}]
    validated = validate_batch([odd, good_group()], 7, LIMITS)
    assert len(validated.groups) == 1
    (rejection,) = validated.rejected
    assert rejection.field == "group" and "RuntimeError: boom" in rejection.reason


def test_rejects_non_objects():
    assert rejected([1, 2]).field == "group"


def test_describe_names_env_step_and_position():
    assert describe({"env_id": 2}, 5, 9) == "env=2/step=9/group=5"
    assert describe("junk", 0, 1) == "env=?/step=1/group=0"


def test_env_metrics_keep_finite_numbers_only():
    raw = good_group()
    raw["group_overrides"] = {"metrics": {"correct": 0.5, "formatted": 1, "note": "x", "bad": math.nan, "flag": True}}
    assert parse_group(raw, "g", LIMITS).env_metrics == {"correct": 0.5, "formatted": 1.0}
    raw["group_overrides"] = {"metrics": "not a dict"}
    assert parse_group(raw, "g", LIMITS).env_metrics == {}


def test_a_sequence_of_exactly_max_token_len_is_accepted_and_one_more_rejected():
    raw = good_group()
    raw["tokens"][0] = [1] * LIMITS.max_token_len
    raw["masks"][0] = [-100] + [1] * (LIMITS.max_token_len - 1)
    assert parse_group(copy.deepcopy(raw), "g", LIMITS).tokens[0] == raw["tokens"][0]
    raw["tokens"][0].append(1)
    raw["masks"][0].append(1)
    assert "exceeds max_token_len 16" in rejected(raw).reason
