"""Advantage schemes: group/batch/none normalisation, env token-level advantages, overrides, clipping."""

import numpy as np
import pytest

from atropos_verl.advantages import token_advantages
from atropos_verl.config import AdvantageConfig
from atropos_verl.groups import GroupLimits, parse_group

LIMITS = GroupLimits(vocab_size=1000, max_token_len=64)


def group(scores, gid="g", **extra):
    n = len(scores)
    raw = {
        "tokens": [[5, 6, 7, 8] for _ in range(n)],
        "masks": [[-100, 6, -100, 8] for _ in range(n)],
        "scores": scores,
        **extra,
    }
    return parse_group(raw, gid, LIMITS)


def sequence_values(result):
    """The advantage of each sequence (constant over its tokens for score-derived ones)."""
    return [[float(row[1]) for row in rows] for rows in result]


def test_group_normalisation_is_grpo():
    result, stats = token_advantages([group([1.0, 0.0, 1.0, 0.0])], AdvantageConfig(clip=None))
    assert sequence_values(result) == [pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)]
    assert stats.mean == pytest.approx(0.0, abs=1e-6)


def test_group_normalisation_without_std_scaling():
    result, _ = token_advantages([group([3.0, 1.0])], AdvantageConfig(scale_by_std=False))
    assert sequence_values(result) == [[1.0, -1.0]]


def test_equal_scores_give_zero_advantage():
    result, _ = token_advantages([group([0.5, 0.5, 0.5])], AdvantageConfig())
    assert sequence_values(result) == [[0.0, 0.0, 0.0]]


def test_batch_normalisation_uses_statistics_across_groups():
    groups = [group([1.0, 1.0]), group([0.0, 0.0])]
    result, _ = token_advantages(groups, AdvantageConfig(normalization="batch", clip=None))
    # Within each group the scores are equal, so only batch statistics separate them.
    assert sequence_values(result) == [pytest.approx([1.0, 1.0], abs=1e-5), pytest.approx([-1.0, -1.0], abs=1e-5)]


def test_none_keeps_raw_scores_then_clips():
    result, stats = token_advantages([group([5.0, -0.5])], AdvantageConfig(normalization="none", clip=[-3.0, 3.0]))
    assert sequence_values(result) == [[3.0, -0.5]]
    assert stats.clipped_fraction == pytest.approx(0.5)


def test_env_token_advantages_win_and_are_clipped():
    env_adv = [[9.0, 9.0, 9.0, 9.0], [0.0, -1.0, 0.0, 2.0]]
    result, stats = token_advantages([group([1.0, 0.0], advantages=env_adv)], AdvantageConfig())
    assert result[0][0].tolist() == [3.0, 3.0, 3.0, 3.0]
    assert result[0][1].tolist() == [0.0, -1.0, 0.0, 2.0]
    assert stats.env_provided_fraction == 1.0
    # Trained tokens are positions 1 and 3: values 3, 3, -1, 2.
    assert stats.mean == pytest.approx((3 + 3 - 1 + 2) / 4)
    assert stats.max == 3.0


def test_env_advantages_ignored_when_disabled():
    env_adv = [[9.0] * 4, [9.0] * 4]
    result, _ = token_advantages(
        [group([1.0, 0.0], advantages=env_adv)], AdvantageConfig(use_env_advantages=False, clip=None)
    )
    assert sequence_values(result) == [pytest.approx([1.0, -1.0], abs=1e-5)]


def test_set_advantage_to_zero_is_exact_and_keeps_group_statistics():
    g = group([1.0, 0.0, 1.0, 0.0], overrides=[{}, {}, {}, {"set_advantage_to_zero": True}])
    result, _ = token_advantages([g], AdvantageConfig())
    values = sequence_values(result)[0]
    assert values[3] == 0.0
    assert np.all(result[0][3] == 0.0)
    # The zeroed sequence still counts in the group's mean and std.
    assert values[:3] == pytest.approx([1.0, -1.0, 1.0], abs=1e-5)


def test_set_advantage_to_zero_beats_env_advantages():
    g = group([1.0, 0.0], advantages=[[2.0] * 4, [2.0] * 4], overrides=[{"set_advantage_to_zero": True}, {}])
    result, _ = token_advantages([g], AdvantageConfig())
    assert result[0][0].tolist() == [0.0] * 4
    assert result[0][1].tolist() == [2.0] * 4


def test_sft_override_trains_with_unit_advantage_outside_statistics():
    g = group([1.0, 0.0, 7.0], overrides=[{}, {}, {"sft": True}])
    result, _ = token_advantages([g], AdvantageConfig(clip=None))
    values = sequence_values(result)[0]
    assert values[2] == 1.0
    assert values[:2] == pytest.approx([1.0, -1.0], abs=1e-5)
