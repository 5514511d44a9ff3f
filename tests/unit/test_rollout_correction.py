"""The rollout correction in verl_policy_loss against an independent per-token computation."""

import math

import numpy as np
import pytest
import torch
from verl.utils import tensordict_utils as tu

from atropos_verl.batch import build_batch
from atropos_verl.config import ConfigError, RolloutCorrectionConfig, load_config
from atropos_verl.groups import GroupLimits, parse_group
from atropos_verl.loss import verl_policy_loss
from atropos_verl.policy.actor import rollout_correction

LIMITS = GroupLimits(vocab_size=1000, max_token_len=64)
TOKENS = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23], [30, 31, 32, 33, 34]]
# Sequence 0: prompt, answer, tool output, answer (two turns).
MASKS = [[-100, -100, 12, 13, -100, 15, 16], [-100, 21, 22, 23], [-100, -100, 32, 33, 34]]
ADVANTAGES = [1.5, -0.7, 0.4]


def scenario(seed=0, spread=0.4):
    """A group with sampler log-probs and the trainer's log-probs, ``spread`` apart on average."""
    rng = np.random.default_rng(seed)
    sampler = [[1.0 if m == -100 else -float(rng.uniform(0.2, 3.0)) for m in masks] for masks in MASKS]
    # trainer[i][t] is the trainer's log p(token t) (unshifted), 0 where untrained.
    trainer = [
        [0.0 if m == -100 else min(lp + float(rng.normal(0.0, spread)), -1e-3) for m, lp in zip(masks, row)]
        for masks, row in zip(MASKS, sampler)
    ]
    return sampler, trainer


def weights_reference(sampler, trainer, cfg):
    """Per-token weights in plain Python from the config's strings (bounds read here, not by the library)."""
    spec = cfg.rollout_is_threshold
    lower, upper = (float(x) for x in spec.split("_")) if "_" in spec else (None, float(spec))
    result = []
    for masks, s_row, t_row in zip(MASKS, sampler, trainer):
        trained = [t for t in range(1, len(masks)) if masks[t] != -100]
        logr = {t: t_row[t] - s_row[t] for t in trained}
        if cfg.rollout_is == "sequence":
            raw = {t: math.exp(sum(logr.values())) for t in trained}
        else:
            raw = {t: math.exp(logr[t]) for t in trained}
        if cfg.rollout_is is None:
            w = {t: 1.0 for t in trained}
        elif lower is None:
            w = {t: min(raw[t], upper) for t in trained}
        else:
            w = {t: raw[t] if lower <= raw[t] <= upper else 0.0 for t in trained}
        for option, threshold in zip((cfg.rollout_rs or "").split(","), (cfg.rollout_rs_threshold or "").split(",")):
            if not option:
                continue
            level, kind = option.rsplit("_", 1)
            div = {
                "k1": lambda x: x,
                "k2": lambda x: 0.5 * x * x,
                "k3": lambda x: math.exp(x) - 1 - x,
            }[kind]
            values = {t: div(logr[t]) for t in trained}
            if level != "token":
                agg = {"seq_sum": sum, "seq_mean": lambda v: sum(v) / len(v), "seq_max": max}[level]
                seq_value = agg(list(values.values()))
                values = {t: seq_value for t in trained}
            if kind == "k1":
                low, high = (float(x) for x in threshold.split("_"))
                keep = {t: math.log(low) <= values[t] <= math.log(high) for t in trained}
            else:
                keep = {t: values[t] <= float(threshold) for t in trained}
            w = {t: w[t] * keep[t] for t in trained}
        result.append((trained, w, raw))
    return result


def run_loss(sampler, trainer, cfg):
    group = parse_group(
        {"tokens": TOKENS, "masks": MASKS, "scores": [0.0] * 3, "inference_logprobs": sampler}, "g", LIMITS
    )
    advantages = [[np.full(len(t), a) for t, a in zip(TOKENS, ADVANTAGES)]]
    batch, stats = build_batch(
        [group], advantages, reduction="token-mean", use_sampling_temperature=False, pad_to_multiple=1
    )
    tu.assign_non_tensor(batch, dp_size=1, batch_num_tokens=float(stats.num_trained_tokens))
    # Shifted layout: slot t holds log p(token t+1). The batch holds float32 values, hence rel=1e-5 below.
    shifted = [torch.tensor(row[1:] + [0.0], dtype=torch.float64, requires_grad=True) for row in trainer]
    log_probs = torch.nested.as_nested_tensor(shifted, layout=torch.jagged)
    loss, metrics = verl_policy_loss({"log_probs": log_probs}, batch, rollout_correction=rollout_correction(cfg))
    loss.backward()
    return loss, metrics, shifted, stats.num_trained_tokens


CONFIGS = [
    RolloutCorrectionConfig(),
    RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold="1.2"),
    RolloutCorrectionConfig(rollout_is="sequence", rollout_is_threshold="2.0"),
    RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold="0.8_1.25"),
    RolloutCorrectionConfig(rollout_is="token", rollout_rs="seq_mean_k3", rollout_rs_threshold="0.05"),
    RolloutCorrectionConfig(rollout_rs="token_k1,seq_max_k2", rollout_rs_threshold="0.7_1.4,0.3"),
    RolloutCorrectionConfig(rollout_is="sequence", rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.rollout_is}-{c.rollout_is_threshold}-{c.rollout_rs}")
def test_loss_gradient_and_metrics_match_reference(cfg):
    sampler, trainer = scenario()
    loss, metrics, shifted, count = run_loss(sampler, trainer, cfg)
    reference = weights_reference(sampler, trainer, cfg)

    want_loss = 0.0
    weights, raws = [], []
    for i, (trained, w, raw) in enumerate(reference):
        for t in trained:
            want_loss += -ADVANTAGES[i] * w[t] * trainer[i][t]
            # d loss / d logp(token t) = -A w / N; the weight itself is not differentiated.
            assert float(shifted[i].grad[t - 1]) == pytest.approx(-ADVANTAGES[i] * w[t] / count, rel=1e-5)
            weights.append(w[t])
            raws.append(raw[t])
    assert float(loss.detach()) == pytest.approx(want_loss / count, rel=1e-5)

    share = float(metrics["actor/inference_logprob_weight_share"])
    assert share == pytest.approx(1.0)
    assert float(metrics["rollout_corr/rollout_is_mean_share"]) == pytest.approx(np.mean(weights), rel=1e-5)
    assert float(metrics["rollout_corr/rollout_is_max"]) == pytest.approx(max(raws), rel=1e-5)
    log_ratios = [trainer[i][t] - sampler[i][t] for i, (trained, _, _) in enumerate(reference) for t in trained]
    assert float(metrics["rollout_corr/kl_share"]) == pytest.approx(-np.mean(log_ratios), rel=1e-5)
    assert float(metrics["rollout_corr/k3_kl_share"]) == pytest.approx(
        np.mean([math.exp(x) - 1 - x for x in log_ratios]), rel=1e-5
    )


def test_scenario_exercises_truncation_masking_and_rejection():
    """The reference comparison above is only meaningful if the bounds actually bite."""
    sampler, trainer = scenario()
    _, tis, _, _ = run_loss(sampler, trainer, CONFIGS[1])
    assert 0 < float(tis["rollout_corr/rollout_is_truncated_fraction_share"]) < 1
    _, icepop, _, _ = run_loss(sampler, trainer, CONFIGS[3])
    assert 0 < float(icepop["rollout_corr/masked_fraction_share"]) < 1
    _, rejected, _, _ = run_loss(sampler, trainer, CONFIGS[4])
    assert 0 < float(rejected["rollout_corr/masked_fraction_share"]) < 1


def test_on_policy_weights_are_one_and_mismatch_zero():
    sampler, _ = scenario()
    trainer = [[0.0 if m == -100 else lp for m, lp in zip(masks, row)] for masks, row in zip(MASKS, sampler)]
    _, metrics, _, _ = run_loss(sampler, trainer, RolloutCorrectionConfig(rollout_is="sequence"))
    assert float(metrics["rollout_corr/rollout_is_mean_share"]) == pytest.approx(1.0)
    assert float(metrics["rollout_corr/rollout_is_max"]) == pytest.approx(1.0)
    assert float(metrics["rollout_corr/kl_share"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"rollout_is": "tokens"}, "rollout_correction.rollout_is"),
        ({"rollout_is_threshold": "two"}, "rollout_correction.rollout_is_threshold"),
        ({"rollout_is_threshold": "2.0_1.0"}, "rollout_correction.rollout_is_threshold"),
        ({"rollout_is_threshold": "-1"}, "rollout_correction.rollout_is_threshold"),
        ({"rollout_rs": "seq_max_k1", "rollout_rs_threshold": "2"}, "rollout_correction.rollout_rs"),
        ({"rollout_rs": "token_k2"}, "rollout_correction.rollout_rs_threshold"),
        ({"rollout_rs": "token_k2", "rollout_rs_threshold": "0.5_2"}, "rollout_correction.rollout_rs_threshold"),
        (
            {"rollout_rs": "token_k2,token_k3", "rollout_rs_threshold": "1,2,3"},
            "rollout_correction.rollout_rs_threshold",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(fields, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RolloutCorrectionConfig(**fields).validate()


def test_k1_single_threshold_is_symmetric():
    assert RolloutCorrectionConfig(rollout_rs="token_k1", rollout_rs_threshold="2").rejections() == [
        ("token_k1", 0.5, 2.0)
    ]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"loss": {"clip_ratio": 0.2}, "rollout_correction": {"rollout_is": "token"}}, "rollout_correction.rollout_is"),
        ({"trainer": {"max_staleness": 1, "stale_groups": "keep"}}, "trainer.stale_groups"),
        ({"trainer": {"max_staleness": -1}}, "trainer.max_staleness"),
        ({"engine": {"sync_interval": 0}}, "engine.sync_interval"),
    ],
)
def test_run_settings_that_contradict_each_other_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides)


def test_keeping_stale_groups_with_a_correction_and_a_float_threshold_are_accepted():
    cfg = load_config(
        {
            "trainer": {"max_staleness": 2, "stale_groups": "keep"},
            "rollout_correction": {"rollout_is": "token", "rollout_is_threshold": 1.5},
        }
    )
    assert cfg.rollout_correction.is_bounds() == (None, 1.5)


@pytest.mark.parametrize(
    "overrides, warned",
    [
        ({}, True),
        ({"rollout_correction": {"rollout_is": "token"}}, False),
        ({"loss": {"clip_ratio": 0.2}}, False),
        ({"engine": {"kind": "vllm"}}, False),
    ],
)
def test_external_engine_without_a_correction_warns_at_start_up(overrides, warned, caplog):
    from atropos_verl.trainer import _warn_uncorrected_external

    with caplog.at_level("WARNING", logger="atropos_verl.trainer"):
        _warn_uncorrected_external(load_config(overrides))
    assert ("no off-policy correction is on" in caplog.text) == warned
