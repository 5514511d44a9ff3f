"""The RL loop on CPU with `engine=vllm`: the trainer starts vLLM + gateway, two unmodified
BaseEnv processes sample the policy through the gateway (server types `vllm` and `openai`),
and after every step the weights are synced and proven.
"""

import pytest
from engine_runs import assert_both_envs_served, assert_every_step_synced, train_with_engine

pytestmark = pytest.mark.integration

STEPS = 3


@pytest.mark.timeout(900)
def test_rl_loop_with_vllm_and_two_environments(atropos_api, tiny_model, tmp_path):
    # The test starts its own environments.
    overrides = ["data=atropos", "engine.gpu_memory_utilization=0.4"]
    run = train_with_engine("vllm", overrides, atropos_api.url, tiny_model, tmp_path, STEPS)

    assert_every_step_synced(run.metrics, STEPS)
    # Step 1's sampler-vs-trainer log-prob check runs where only the vllm-type env samples (step 1
    # here may hold only the openai env's groups): test_train_lora_with_vllm.py.
    assert_both_envs_served(run, "vllm")
