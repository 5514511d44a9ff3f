"""KL estimators, top-k distillation and entropy against independent computations; masked slots get no gradient."""

import math

import numpy as np
import pytest
import torch
from verl.utils import tensordict_utils as tu

from atropos_verl.batch import build_batch
from atropos_verl.config import KL_LOSS_TYPES
from atropos_verl.groups import GroupLimits, GroupRejected, parse_group
from atropos_verl.loss import verl_policy_loss
from atropos_verl.regularizers import (
    Regularizers,
    kl_estimate,
    logit_inputs,
    logit_outputs,
    token_entropy,
    topk_kl,
)


def reference_kl(logp: float, ref: float, kind: str) -> float:
    """Schulman's estimators written out per token, with verl's clamps for k3."""
    kind = kind.rstrip("+")
    d = logp - ref
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return abs(d)
    if kind in ("k2", "mse"):
        return d * d / 2
    log_r = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(log_r) - log_r - 1, -10.0), 10.0)


@pytest.mark.parametrize("kind", KL_LOSS_TYPES)
def test_kl_estimators_match_their_definitions(kind):
    torch.manual_seed(0)
    logp = (-torch.rand(50, dtype=torch.float64) * 5).requires_grad_()
    ref = -torch.rand(50, dtype=torch.float64) * 5
    got = kl_estimate(logp, ref, kind)
    want = [reference_kl(a, b, kind) for a, b in zip(logp.tolist(), ref.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    got.sum().backward()
    if kind.endswith("+") or kind in ("k2", "mse"):
        # k2's gradient d(d^2/2)/dlogp = d: the straight-through variants keep it.
        assert logp.grad.tolist() == pytest.approx((logp - ref).detach().tolist(), rel=1e-12)


def test_k3_is_zero_at_equality_and_nonnegative():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert kl_estimate(logp, logp.clone(), "low_var_kl").tolist() == [0.0, 0.0, 0.0]
    assert (kl_estimate(logp, logp + torch.tensor([0.3, -0.7, 1.0]), "k3") > 0).all()


def reference_topk_kl(student_logits, teacher_logprobs, direction):
    """Renormalise both on the support (Python floats), then KL in the named direction."""
    zs = math.log(sum(math.exp(v) for v in student_logits))
    zt = math.log(sum(math.exp(v) for v in teacher_logprobs))
    q = [math.exp(v - zs) for v in student_logits]
    p = [math.exp(v - zt) for v in teacher_logprobs]
    if direction == "forward":
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_kl_is_the_kl_of_renormalised_distributions(direction):
    torch.manual_seed(1)
    student = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    # Teacher top-k log-probs sum to less than 1 in probability: renormalised on the support.
    teacher = torch.log_softmax(torch.randn(6, 10, dtype=torch.float64), -1)[:, :4]
    valid = torch.ones(6, 4, dtype=torch.bool)
    valid[2, 3] = False  # a narrower top-k padded to the batch's K
    valid[5] = False  # no teacher at this position
    got = topk_kl(student, teacher, valid, direction)
    for row in range(6):
        keep = valid[row].nonzero().squeeze(1).tolist()
        want = reference_topk_kl(student[row, keep].tolist(), teacher[row, keep].tolist(), direction) if keep else 0.0
        assert got[row].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    got.sum().backward()
    assert student.grad[2, 3] == 0 and (student.grad[5] == 0).all()
    assert torch.isfinite(student.grad).all()
    # Only the odds within the support matter: a constant per position changes nothing.
    shifted = topk_kl(student.detach() + torch.arange(6.0, dtype=torch.float64)[:, None], teacher, valid, direction)
    assert shifted.tolist() == pytest.approx(got.detach().tolist(), abs=1e-12)
    assert topk_kl(teacher, teacher, valid, direction).abs().max() < 1e-12


def test_entropy_matches_categorical_and_its_gradient():
    torch.manual_seed(2)
    logits = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([0, 3, 4, 6])
    # A tiny chunk so that several chunks run.
    got = token_entropy(logits, positions, chunk_bytes=4 * 13 * 2)
    reference_logits = logits.detach().clone().requires_grad_()
    want = torch.distributions.Categorical(logits=reference_logits[positions]).entropy()
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-6)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-7)
    assert (logits.grad[[1, 2, 5]] == 0).all()


LIMITS = GroupLimits(vocab_size=20, max_token_len=32)
TOKENS = [[1, 2, 3, 4, 5], [6, 7, 8]]
MASKS = [[-100, -100, 3, 4, 5], [-100, 7, 8]]


def teacher_group(ref_shift=0.3, top_k=3, seed=3):
    rng = np.random.default_rng(seed)
    ids, logprobs, ref = [], [], []
    for tokens in TOKENS:
        ids.append([rng.choice(20, size=top_k, replace=False).tolist() for _ in tokens])
        logprobs.append([sorted((-rng.random(top_k) * 4).tolist(), reverse=True) for _ in tokens])
        ref.append([-1.0 - ref_shift * t for t in range(len(tokens))])
    # A position the teacher skips (prompt): an empty top-k.
    ids[0][1], logprobs[0][1] = [], []
    return {
        "tokens": TOKENS,
        "masks": MASKS,
        "scores": [1.0, 0.0],
        "ref_logprobs": ref,
        "distill_token_ids": ids,
        "distill_logprobs": logprobs,
    }


def test_teacher_fields_travel_in_the_shifted_layout():
    raw = teacher_group()
    group = parse_group(raw, "g", LIMITS)
    advantages = [[np.ones(len(t)) for t in TOKENS]]
    batch, _ = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=4
    )
    top_k = tu.get_non_tensor_data(batch, "distill_top_k", None)
    assert top_k == 3
    ref_rows = [r.tolist() for r in batch["ref_log_probs"].unbind()]
    assert ref_rows[0] == pytest.approx(raw["ref_logprobs"][0][1:] + [0.0])
    assert [r.tolist() for r in batch["has_ref_log_probs"].unbind()][:2] == [[1.0] * 5, [1.0] * 3]
    ids = batch["distill_token_ids"].unbind()[0].view(-1, 3)
    logprobs = batch["distill_logprobs"].unbind()[0].view(-1, 3)
    # Slot t holds the teacher's top-k for token t+1; the skipped position and the last slot are -1.
    assert ids[0].tolist() == [-1, -1, -1] and ids[4].tolist() == [-1, -1, -1]
    assert ids[1].tolist() == raw["distill_token_ids"][0][2]
    assert logprobs[3].tolist() == pytest.approx(raw["distill_logprobs"][0][4])
    # Padding rows (2 of 4) carry no reference and no teacher.
    assert batch["has_ref_log_probs"].unbind()[3].sum() == 0
    assert (batch["distill_token_ids"].unbind()[3] == -1).all()


def packed_loss(batch, logits, terms):
    """verl_policy_loss on the packed batch, with logits (tokens, V) as the padded-rows step would hand them."""
    flat = logits.reshape(-1, logits.shape[-1])
    labels = torch.roll(batch["input_ids"].values(), -1)
    logp = torch.log_softmax(flat, -1).gather(-1, labels[:, None]).squeeze(1)
    offsets = batch["input_ids"].offsets()
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(logp, offsets)}
    tu.assign_non_tensor(batch, compute_entropy=terms.needs_entropy, dp_size=1)
    tu.assign_non_tensor(batch, batch_num_tokens=float(batch["loss_mask"].values().sum()))
    model_output.update(logit_outputs(flat, logit_inputs(batch, None), logp.numel()))
    return verl_policy_loss(model_output, batch, terms=terms)


def test_distillation_kl_and_entropy_terms_against_a_direct_computation():
    raw = teacher_group()
    group = parse_group(raw, "g", LIMITS)
    advantages = [[np.zeros(len(t)) for t in TOKENS]]
    batch, _ = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1
    )
    torch.manual_seed(4)
    logits = torch.randn(8, 20, dtype=torch.float64, requires_grad=True)
    terms = Regularizers(
        policy_coef=1.0,
        use_kl_loss=True,
        kl_loss_coef=0.5,
        kl_loss_type="k3",
        distill_coef=2.0,
        distill_direction="reverse",
        entropy_coeff=0.1,
    )
    loss, metrics = packed_loss(batch, logits, terms)

    # Independently: per trained token (t >= 1, mask != -100) of each sequence, predicted by row t-1.
    total, count, kl_sum, distill_sum, entropy_sum = 0.0, 0, 0.0, 0.0, 0.0
    row_start = 0
    for tokens, mask, ref, ids, lps in zip(
        TOKENS, MASKS, raw["ref_logprobs"], raw["distill_token_ids"], raw["distill_logprobs"]
    ):
        for t in range(1, len(tokens)):
            if mask[t] == -100:
                continue
            row = logits[row_start + t - 1].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            logp = row[tokens[t]] - log_z
            kl = reference_kl(logp, ref[t], "k3")
            distill = reference_topk_kl([row[i] for i in ids[t]], lps[t], "reverse")
            probs = [math.exp(v - log_z) for v in row]
            entropy = -sum(p * math.log(p) for p in probs)
            total += 0.5 * kl + 2.0 * distill - 0.1 * entropy
            kl_sum, distill_sum, entropy_sum = kl_sum + kl, distill_sum + distill, entropy_sum + entropy
            count += 1
        row_start += len(tokens)
    assert loss.item() == pytest.approx(total / count, rel=1e-6)
    assert metrics["actor/kl_loss_share"].item() == pytest.approx(kl_sum / count, rel=1e-6)
    assert metrics["actor/distill_kl_share"].item() == pytest.approx(distill_sum / count, rel=1e-6)
    assert metrics["actor/entropy"].item() == pytest.approx(entropy_sum / count, rel=1e-6)

    loss.backward()
    # Rows predicting an untrained token (prompt, last slot of each sequence) get exactly zero gradient.
    for row in (0, 4, 7):
        assert (logits.grad[row] == 0).all(), row
    assert (logits.grad[[1, 2, 3, 5, 6]].abs().sum(-1) > 0).all()


def test_terms_off_leave_the_policy_loss_unchanged():
    group = parse_group(teacher_group(), "g", LIMITS)
    advantages = [[np.full(len(t), 0.7) for t in TOKENS]]
    batch, _ = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1
    )
    logits = torch.randn(8, 20, dtype=torch.float64)
    plain, _ = packed_loss(batch, logits, Regularizers())
    with_metrics_only, metrics = packed_loss(batch, logits, Regularizers(kl_loss_coef=1.0, calculate_entropy=True))
    assert plain.item() == pytest.approx(with_metrics_only.item(), rel=1e-12)
    assert metrics["actor/kl_loss_share"].item() > 0 and metrics["actor/entropy"].item() > 0


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda g: g.pop("distill_logprobs"), "distill_logprobs", "missing while distill_token_ids is sent"),
        (lambda g: g["distill_token_ids"].pop(), "distill_token_ids", "1 sequences but tokens has 2"),
        (lambda g: g["distill_logprobs"][1].pop(), "distill_logprobs[1]", "length 2 != tokens[1] length 3"),
        (lambda g: g["distill_logprobs"][0][2].pop(), "distill_logprobs[0][2]", "2 values for 3 token ids"),
        (lambda g: g["distill_token_ids"][0][2].__setitem__(0, 20), "distill_token_ids[0][2]", "token id 20 outside"),
        (
            lambda g: g["distill_token_ids"][0][2].__setitem__(1, g["distill_token_ids"][0][2][0]),
            "distill_token_ids[0][2]",
            "appears twice",
        ),
        (lambda g: g["distill_logprobs"][1][0].__setitem__(0, 0.5), "distill_logprobs[1][0]", "not a log-prob"),
        (
            lambda g: g["distill_logprobs"][1][0].__setitem__(0, float("nan")),
            "distill_logprobs[1][0]",
            "not a log-prob",
        ),
        (lambda g: g["ref_logprobs"][0].pop(), "ref_logprobs[0]", "length 4 != tokens[0] length 5"),
        (lambda g: g["ref_logprobs"][0].__setitem__(3, 0.5), "ref_logprobs[0][3]", "outside"),
        (lambda g: g.__setitem__("distill_token_ids", [[[1.5]]]), "distill_token_ids.0.0.0", "integer"),
    ],
)
def test_teacher_and_reference_shapes_are_named_rejections(mutate, field, reason):
    raw = teacher_group()
    mutate(raw)
    with pytest.raises(GroupRejected) as info:
        parse_group(raw, "g", LIMITS)
    assert info.value.field == field
    assert reason in info.value.reason


def test_top_k_is_bounded():
    raw = teacher_group(top_k=3)
    raw["distill_token_ids"][0][2] = list(range(1025))
    raw["distill_logprobs"][0][2] = [-1.0] * 1025
    with pytest.raises(GroupRejected, match="exceeds 1024"):
        parse_group(raw, "g", GroupLimits(vocab_size=2000, max_token_len=32))


def test_config_names_the_key_for_terms_that_cannot_run():
    from atropos_verl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.policy_coef: is 0 and no other term"):
        load_config({"loss": {"policy_coef": 0.0}})
    with pytest.raises(ConfigError, match="loss.kl_loss_type: must be one of"):
        load_config({"loss": {"kl_loss_type": "k4"}})
    with pytest.raises(ConfigError, match="model.use_remove_padding: must be false with loss.distill_coef"):
        load_config({"loss": {"distill_coef": 1.0}, "model": {"attn_implementation": "flash_attention_2"}})
    distill_only = load_config({"loss": {"policy_coef": 0.0, "distill_coef": 1.0}})
    assert Regularizers.from_config(distill_only.loss).distill_coef == 1.0


def test_padded_logits_give_the_packed_outputs():
    """The padded-rows step hands logit_outputs (rows, width, V) logits and each packed slot's flat position."""
    from atropos_verl.policy.fsdp_engine import PaddedRows

    group = parse_group(teacher_group(), "g", LIMITS)
    advantages = [[np.ones(len(t)) for t in TOKENS]]
    batch, _ = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1
    )
    tu.assign_non_tensor(batch, compute_entropy=True)
    packed = torch.randn(8, 20, dtype=torch.float64)
    rows = PaddedRows(batch["input_ids"].offsets())
    padded = torch.zeros(rows.rows * rows.width, 20, dtype=torch.float64)
    padded[rows.slots] = packed
    got = logit_outputs(padded.view(rows.rows, rows.width, 20), logit_inputs(batch, rows.slots), 8)
    want = logit_outputs(packed, logit_inputs(batch, None), 8)
    assert set(got) == {"entropy", "distill_student_logits"}
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    trained = batch["loss_mask"].values() > 0
    ids = batch["distill_token_ids"].values().view(-1, 3)
    assert torch.equal(got["distill_student_logits"][trained], packed[trained].gather(1, ids[trained]))
    assert (got["entropy"][~trained] == 0).all()


def test_distillation_alone_and_no_terms_at_all():
    group = parse_group(teacher_group(), "g", LIMITS)
    advantages = [[np.full(len(t), 0.7) for t in TOKENS]]
    batch, _ = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1
    )
    logits = torch.randn(8, 20, dtype=torch.float64)
    without, _ = packed_loss(batch, logits, Regularizers())
    tu.assign_non_tensor(batch, compute_entropy=False)
    labels = torch.roll(batch["input_ids"].values(), -1)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(1)
    offsets = batch["input_ids"].offsets()
    bare, _ = verl_policy_loss({"log_probs": torch.nested.nested_tensor_from_jagged(logp, offsets)}, batch)
    assert without.item() == bare.item()
    alone, metrics = packed_loss(batch, logits, Regularizers(policy_coef=0.0, distill_coef=1.0))
    assert alone.item() == pytest.approx(metrics["actor/distill_kl_share"].item(), rel=1e-12)
