"""Packing groups into verl's shifted no-padding layout."""

import numpy as np
import pytest
import torch

from atropos_verl.batch import build_batch
from atropos_verl.groups import GroupLimits, parse_group

LIMITS = GroupLimits(vocab_size=1000, max_token_len=64)


def make_group(**extra):
    raw = {
        "tokens": [[10, 11, 12, 13, 14, 15], [20, 21, 22]],
        # Sequence 0: prompt, answer, mid-sequence tool output, answer.
        "masks": [[-100, -100, 12, -100, 14, 15], [-100, 21, 22]],
        "scores": [1.0, 0.0],
        **extra,
    }
    return parse_group(raw, "g", LIMITS)


def advantages_for(group, values):
    return [[np.full(len(t), v, dtype=np.float64) for t, v in zip(group.tokens, values)]]


def rows(batch, key):
    return [t.tolist() for t in batch[key].unbind()]


def test_shifted_layout_of_mask_and_advantages():
    group = make_group()
    adv = [[np.arange(6, dtype=np.float64), np.array([0.0, 7.0, 8.0])]]
    batch, stats = build_batch([group], adv, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1)
    assert rows(batch, "input_ids") == [[10, 11, 12, 13, 14, 15], [20, 21, 22]]
    assert rows(batch, "position_ids") == [[0, 1, 2, 3, 4, 5], [0, 1, 2]]
    # Slot t describes token t+1: tokens 2, 4, 5 trained -> slots 1, 3, 4; the -100 at 3 stays untrained.
    assert rows(batch, "loss_mask") == [[0, 1, 0, 1, 1, 0], [1, 1, 0]]
    assert rows(batch, "advantages") == [[1, 2, 3, 4, 5, 0], [7, 8, 0]]
    assert rows(batch, "has_old_log_probs") == [[0] * 6, [0] * 3]
    assert stats.num_trained_tokens == 5
    assert stats.num_tokens == 9
    assert batch["temperature"] == 1.0


def test_position_zero_is_never_trained():
    group = parse_group({"tokens": [[1, 2, 3]], "masks": [[1, 2, 3]], "scores": [1.0]}, "g", LIMITS)
    batch, stats = build_batch(
        [group], advantages_for(group, [1.0]), reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1
    )
    assert rows(batch, "loss_mask") == [[1, 1, 0]]
    assert stats.num_trained_tokens == 2


def test_sequence_mean_weights_sum_to_one_per_sequence():
    group = make_group()
    batch, _ = build_batch(
        [group],
        advantages_for(group, [1.0, 1.0]),
        reduction="sequence-mean",
        use_sampling_temperature=True,
        pad_to_multiple=1,
    )
    sums = [sum(r) for r in rows(batch, "loss_mask")]
    assert sums == pytest.approx([1.0, 1.0])


def test_inference_logprobs_are_shifted_with_a_validity_mask():
    group = make_group(inference_logprobs=[[1.0, 1.0, -0.1, 1.0, -0.2, -0.3], [1.0, -0.4, -0.5]])
    batch, _ = build_batch(
        [group],
        advantages_for(group, [1.0, 1.0]),
        reduction="token-mean",
        use_sampling_temperature=True,
        pad_to_multiple=1,
    )
    assert rows(batch, "old_log_probs")[1] == pytest.approx([-0.4, -0.5, 0.0])
    assert rows(batch, "old_log_probs")[0] == pytest.approx([1.0, -0.1, 1.0, -0.2, -0.3, 0.0])
    assert rows(batch, "has_old_log_probs") == [[1] * 6, [1] * 3]


def test_per_sequence_temperature_and_switch():
    group = make_group(overrides=[{"temperature": 0.5}, {}], generation_params={"temperature": 0.9})
    batch, _ = build_batch(
        [group],
        advantages_for(group, [1.0, 1.0]),
        reduction="token-mean",
        use_sampling_temperature=True,
        pad_to_multiple=1,
    )
    assert batch["temperature"].tolist() == pytest.approx([0.5, 0.9])
    batch, _ = build_batch(
        [group],
        advantages_for(group, [1.0, 1.0]),
        reduction="token-mean",
        use_sampling_temperature=False,
        pad_to_multiple=1,
    )
    assert batch["temperature"] == 1.0


def test_padding_rows_carry_no_weight():
    group = make_group()
    batch, stats = build_batch(
        [group],
        advantages_for(group, [1.0, -1.0]),
        reduction="token-mean",
        use_sampling_temperature=True,
        pad_to_multiple=4,
    )
    assert batch.batch_size[0] == 4
    assert stats.num_sequences == 2
    assert stats.num_padding_sequences == 2
    padding = rows(batch, "loss_mask")[2:]
    assert all(sum(r) == 0 for r in padding)
    assert rows(batch, "input_ids")[2] == [20, 21, 22]
    assert torch.equal(batch["loss_mask"].values().sum(), torch.tensor(5.0))


def test_sequence_mean_ignores_a_trained_mark_on_position_zero():
    # Position 0 has no prediction: a mask marking it trained must neither get a weight nor
    # dilute the 1/n_i of the tokens that are trained.
    group = parse_group(
        {"tokens": [[1, 2, 3], [4, 5, 6]], "masks": [[1, 2, 3], [-100, 5, 6]], "scores": [1.0, 0.0]}, "g", LIMITS
    )
    batch, stats = build_batch(
        [group],
        advantages_for(group, [1.0, 1.0]),
        reduction="sequence-mean",
        use_sampling_temperature=True,
        pad_to_multiple=1,
    )
    assert rows(batch, "loss_mask") == [pytest.approx([0.5, 0.5, 0.0])] * 2
    assert stats.num_trained_tokens == 4
