"""The RL loop on CPU with `engine=sglang`: the trainer starts SGLang (its own venv) + gateway,
two unmodified BaseEnv processes sample the policy through the gateway (atroposlib's `sglang`
server type on SGLang's native /generate, and `openai`), and after every step the weights are
synced and proven: engine.weight_transport=auto picks SGLang's /update_weights_from_tensor from the
trainer's shared-memory buckets on CPU.
"""

import pytest
from engine_runs import assert_both_envs_served, assert_every_step_synced, train_with_engine

pytestmark = [pytest.mark.integration, pytest.mark.sglang]

STEPS = 2


@pytest.mark.timeout(900)
def test_rl_loop_with_sglang_and_two_environments(atropos_api, tiny_model, sglang_python, tmp_path):
    run = train_with_engine("sglang", [f"engine.python={sglang_python}"], atropos_api.url, tiny_model, tmp_path, STEPS)

    assert_every_step_synced(run.metrics, STEPS)
    assert_both_envs_served(run, "sglang")
    assert "SGLang replica 'sglang-0'" in run.trainer_log
    assert "weight transport: shared_memory (engine.weight_transport=auto; SGLang /update_weights_from_tensor)" in (
        run.trainer_log
    )
    for step in range(1, STEPS + 1):
        assert f"loaded policy version {step} from the trainer's tensors" in run.trainer_log


@pytest.mark.timeout(900)
def test_rl_loop_with_sglang_synced_by_gloo_broadcast(atropos_api, tiny_model, sglang_python, tmp_path):
    """engine.weight_transport=nccl on CPU: the policy's rank-0 Ray worker (inside FSDP's own process group)
    joins SGLang's weight-update group over gloo and broadcasts every step's weights.

    Only the sglang-type environment runs, so every group carries the sampler's log-probs.
    """
    overrides = [f"engine.python={sglang_python}", "engine.weight_transport=nccl"]
    run = train_with_engine("sglang", overrides, atropos_api.url, tiny_model, tmp_path, STEPS, server_types=("sglang",))

    assert_every_step_synced(run.metrics, STEPS)
    # Step 1 trains on groups sampled before any update: the log-probs SGLang returned through the
    # gateway equal the trainer's own up to float noise.
    assert run.metrics[0]["train/inference_logprob_abs_diff"] < 1e-3
    # The gateway recorded every answer SGLang's /generate gave with its policy version: no group's age is unknown.
    assert all(m["staleness/unknown"] == 0 and m["staleness/max"] >= 0 for m in run.metrics), run.metrics
    assert "weight transport: nccl (SGLang /update_weights_from_distributed, gloo)" in run.trainer_log
    for step in range(1, STEPS + 1):
        assert f"received policy version {step} by broadcast" in run.trainer_log
