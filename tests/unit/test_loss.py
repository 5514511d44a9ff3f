"""advantage_weighted_token_loss against an independent computation, and its gradient."""

import math

import pytest
import torch

from atropos_verl.loss import advantage_weighted_token_loss, token_objective


def reference_loss(logits, input_ids, advantages, loss_mask, reduction):
    """Plain Python loops over (b, t) with an explicit softmax: no shared code with the library."""
    batch, length, vocab = logits.shape
    per_sequence_sums, per_sequence_counts = [], []
    total, count = 0.0, 0.0
    for b in range(batch):
        seq_sum, seq_count = 0.0, 0.0
        for t in range(1, length):
            if loss_mask[b, t] == 0:
                continue
            row = logits[b, t - 1].tolist()
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            logp = row[int(input_ids[b, t])] - log_z
            seq_sum += -float(advantages[b, t]) * logp
            seq_count += 1
        per_sequence_sums.append(seq_sum)
        per_sequence_counts.append(seq_count)
        total += seq_sum
        count += seq_count
    if reduction == "sum":
        return total
    if reduction == "token-mean":
        return total / count
    means = [s / c for s, c in zip(per_sequence_sums, per_sequence_counts) if c > 0]
    return sum(means) / len(means)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    batch, length, vocab = 3, 9, 11
    logits = torch.randn(batch, length, vocab, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (batch, length))
    advantages = torch.randn(batch, length, dtype=torch.float64)
    loss_mask = torch.tensor(
        [
            [0, 0, 1, 1, 0, 0, 1, 1, 1],  # prompt, answer, mid-sequence tool output, answer
            [1, 1, 1, 1, 1, 1, 1, 1, 1],  # position 0 marked trained: must still be ignored
            [0, 0, 0, 0, 0, 1, 0, 0, 0],
        ]
    )
    return logits, input_ids, advantages, loss_mask


@pytest.mark.parametrize("reduction", ["token-mean", "sequence-mean", "sum"])
def test_matches_independent_computation(batch, reduction):
    logits, input_ids, advantages, loss_mask = batch
    got = advantage_weighted_token_loss(logits, input_ids, advantages, loss_mask, reduction=reduction)
    want = reference_loss(logits, input_ids, advantages, loss_mask, reduction)
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_masked_tokens_get_exactly_zero_gradient(batch):
    logits, input_ids, advantages, loss_mask = batch
    logits = logits.clone().requires_grad_(True)
    advantages = advantages.clone()
    # Huge advantages on masked tokens must not leak into the gradient.
    advantages[loss_mask == 0] = 1e6
    advantage_weighted_token_loss(logits, input_ids, advantages, loss_mask).backward()
    grad = logits.grad
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            predicting_row = grad[b, t - 1]
            if loss_mask[b, t] == 0:
                assert torch.count_nonzero(predicting_row) == 0, (b, t)
            else:
                assert torch.count_nonzero(predicting_row) > 0, (b, t)
    # The last position predicts nothing.
    assert torch.count_nonzero(grad[:, -1]) == 0


def test_gradient_direction_follows_advantage_sign():
    torch.manual_seed(1)
    logits = torch.zeros(2, 2, 5, requires_grad=True)
    input_ids = torch.tensor([[0, 3], [0, 3]])
    advantages = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    loss_mask = torch.tensor([[0, 1], [0, 1]])
    advantage_weighted_token_loss(logits, input_ids, advantages, loss_mask).backward()
    # Gradient descent raises the logit of a positively rewarded token and lowers a penalised one.
    assert logits.grad[0, 0, 3] < 0
    assert logits.grad[1, 0, 3] > 0


def test_nan_logits_at_masked_positions_do_not_poison_the_loss(batch):
    logits, input_ids, advantages, loss_mask = batch
    logits = logits.clone()
    logits[2, 0] = float("nan")  # predicts token 1 of sequence 2, which is masked
    loss = advantage_weighted_token_loss(logits, input_ids, advantages, loss_mask)
    assert torch.isfinite(loss)


def test_all_masked_batch_gives_zero_not_nan(batch):
    logits, input_ids, advantages, _ = batch
    zeros = torch.zeros_like(input_ids)
    for reduction in ("token-mean", "sequence-mean", "sum"):
        assert advantage_weighted_token_loss(logits, input_ids, advantages, zeros, reduction=reduction).item() == 0.0


def test_rejects_bad_shapes_and_reduction(batch):
    logits, input_ids, advantages, loss_mask = batch
    with pytest.raises(ValueError, match="reduction"):
        advantage_weighted_token_loss(logits, input_ids, advantages, loss_mask, reduction="mean")
    with pytest.raises(ValueError, match="advantages"):
        advantage_weighted_token_loss(logits, input_ids, advantages[:, :-1], loss_mask)
    with pytest.raises(ValueError, match="logits"):
        advantage_weighted_token_loss(logits[0], input_ids, advantages, loss_mask)


def test_clipped_objective_equals_plain_gradient_on_policy_and_clips_off_policy():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    plain = token_objective(logp, advantages).sum()
    (plain_grad,) = torch.autograd.grad(plain, logp)
    clipped = token_objective(logp, advantages, old_logp=logp.detach(), clip_ratio=0.2).sum()
    (clipped_grad,) = torch.autograd.grad(clipped, logp)
    assert torch.allclose(plain_grad, -advantages)
    # d/dlogp of -(ratio*A) at ratio 1 is -A: identical on-policy.
    assert torch.allclose(clipped_grad, plain_grad)

    # Far off-policy with a positive advantage: the ratio is clipped, so no gradient.
    old = torch.tensor([-3.0, -2.0, -0.5])
    clipped = token_objective(logp, advantages, old_logp=old, clip_ratio=0.2).sum()
    (grad,) = torch.autograd.grad(clipped, logp)
    assert grad[0] == 0.0
