"""Training on what an environment sends beyond tokens and scores: reference log-probs, a teacher's
top-k, evaluation results (tests/envs/teacher_env.py, real models on both sides).

A hosted reference (loss.ref_model) stands in where an env sends no ref_logprobs.

One short CPU run with the RL term, the KL to the reference (the policy's own starting
weights) and distillation toward the teacher:

* the KL metric is 0 at step 1, where the policy still equals the reference, and grows
  as the policy trains away from it;
* the KL to the teacher on its renormalised top-k falls step after step;
* the environment's start-up evaluation lands in metrics.jsonl, and matches what the
  trainer measures on the same tokens with the same weights.
"""

import pytest
from procs import base_overrides, run_to_end, train_command

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration

STEPS = 4


@pytest.mark.timeout(900)
def test_reference_kl_distillation_and_env_evaluations(tmp_path):
    run_dir = tmp_path / "run"
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), STEPS),
            "data=teacher",
            "loss.use_kl_loss=true",
            "loss.kl_loss_coef=0.01",
            "loss.kl_loss_type=low_var_kl",
            "loss.distill_coef=1.0",
            "loss.calculate_entropy=true",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ),
        tmp_path / "trainer.log",
        timeout=800,
    )
    assert code == 0, log[-5000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))

    kl = [m["actor/kl_loss"] for m in metrics]
    assert kl[0] < 1e-7, kl
    assert all(a < b for a, b in zip(kl, kl[1:])), kl
    assert kl[-1] > 1e-4, kl

    distill = [m["actor/distill_kl"] for m in metrics]
    assert all(a > b for a, b in zip(distill, distill[1:])), distill
    assert distill[-1] < 0.9 * distill[0], distill
    assert all(m["actor/entropy"] > 0 for m in metrics)

    # The environment evaluated before its first group: the report lands at step 1, once.
    first = metrics[0]
    assert "eval/teacher_topk_mass" in first and 0 < first["eval/teacher_topk_mass"] < 1
    # Its reference is the policy's starting point: the same mean log-prob of the answers.
    assert first["eval/reference_answer_logprob"] == pytest.approx(first["train/logprob"], abs=1e-4)
    assert all("eval/teacher_topk_mass" not in m for m in metrics[1:])
    assert "eval/teacher_topk_mass" in log


@pytest.mark.timeout(900)
def test_hosted_reference_for_sequences_sent_without_ref_logprobs(tmp_path):
    """The scripted env sends no ref_logprobs: the trainer's frozen copy of the starting weights is the reference
    (at the group's sampling temperature, as the policy's log-probs)."""
    run_dir = tmp_path / "run"
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), 3),
            "data=scripted",
            "data.envs.0.args=[--env.pattern,score]",
            "loss.use_kl_loss=true",
            "loss.kl_loss_type=k1",
            "loss.ref_model=policy",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ),
        tmp_path / "trainer.log",
        timeout=800,
    )
    assert code == 0, log[-5000:]
    kl = [m["actor/kl_loss"] for m in read_metrics(run_dir / "metrics.jsonl")]
    assert abs(kl[0]) < 1e-6, kl
    assert kl[0] < kl[1] < kl[2], kl
    assert kl[2] > 1e-3, kl
