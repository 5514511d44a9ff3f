"""The RL loop on CPU with `engine=vllm`: the trainer starts vLLM + gateway, two unmodified
BaseEnv processes sample the policy through the gateway (server types `vllm` and `openai`),
and after every step the weights are synced and proven.
"""

import json
import sys
import time

import pytest
from procs import REPO, spawn

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration

STEPS = 3


def parity_env(server_type, api_url, gateway_url, tiny_model, groups_file):
    return [
        sys.executable,
        str(REPO / "tests" / "envs" / "parity_env.py"),
        "serve",
        "--env.rollout_server_url",
        api_url,
        "--env.tokenizer_name",
        tiny_model,
        "--env.data_path_to_save_groups",
        str(groups_file),
        "--openai.base_url",
        f"{gateway_url}/v1",
        "--openai.model_name",
        tiny_model,
        "--openai.server_type",
        server_type,
        "--openai.api_key",
        "unused",
    ]


def read_groups(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.timeout(900)
def test_rl_loop_with_vllm_and_two_environments(atropos_api, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    gateway_url = f"http://127.0.0.1:{free_port()}"
    trainer = spawn(
        [
            sys.executable,
            "-m",
            "atropos_verl.train",
            # The test starts its own environments.
            "data=atropos",
            "engine=vllm",
            f"model.path={tiny_model}",
            f"atropos.api_url={atropos_api.url}",
            "atropos.batch_timeout=300",
            "trainer.device=cpu",
            "trainer.batch_size=16",
            "trainer.max_token_len=256",
            f"trainer.total_training_steps={STEPS}",
            f"trainer.run_dir={run_dir}",
            "trainer.logger=[]",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "actor.dtype=float32",
            "actor.lr=1e-3",
            "engine.dtype=float32",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            f"engine.gateway_port={gateway_url.rsplit(':', 1)[1]}",
            "engine.sync_check_threshold=0.001",
        ],
        tmp_path / "trainer.log",
    )
    envs = [
        spawn(
            parity_env("vllm", atropos_api.url, gateway_url, tiny_model, tmp_path / "vllm_groups.jsonl"),
            tmp_path / "env_vllm.log",
        ),
        spawn(
            parity_env("openai", atropos_api.url, gateway_url, tiny_model, tmp_path / "openai_groups.jsonl"),
            tmp_path / "env_openai.log",
        ),
    ]
    try:
        deadline = time.monotonic() + 720
        while trainer.running and time.monotonic() < deadline:
            for env, name in zip(envs, ("env_vllm", "env_openai")):
                assert env.running, (tmp_path / f"{name}.log").read_text()[-3000:]
            time.sleep(1)
        trainer_log = (tmp_path / "trainer.log").read_text()
        assert trainer.returncode() == 0, trainer_log[-6000:]
    finally:
        for proc in envs + [trainer]:
            proc.stop(timeout_s=60)

    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        # Every step synced into the replica and the replica then agreed with the trainer.
        assert m["sync/policy_version"] == m["step"]
        assert m["sync/logprob_abs_diff"] < 1e-3
        assert m["sync/bytes"] > 0
        assert m["timing/sync_s"] > 0
        assert m["data/groups_rejected"] == 0
    # Step 1 trains on groups sampled before any update: where the vllm-type env sent the
    # sampler's log-probs, they equal the trainer's own up to float noise.
    if "train/inference_logprob_abs_diff" in metrics[0]:
        assert metrics[0]["train/inference_logprob_abs_diff"] < 1e-3

    # Both unmodified environments got completions through the gateway.
    vllm_groups = read_groups(tmp_path / "vllm_groups.jsonl")
    openai_groups = read_groups(tmp_path / "openai_groups.jsonl")
    assert vllm_groups and openai_groups
    for group in vllm_groups:
        assert len(group["tokens"]) == 4
        for tokens, masks, logprobs in zip(group["tokens"], group["masks"], group["inference_logprobs"]):
            assert len(tokens) == len(masks) == len(logprobs)
            assert any(m != -100 for m in masks)
            assert all(lp <= 0 for lp, m in zip(logprobs, masks) if m != -100)
    for group in openai_groups:
        assert all(any(m != -100 for m in masks) for masks in group["masks"])
    assert "gateway for environments: " + gateway_url in trainer_log
