"""A LoRA run end to end on CPU with ``engine=sglang``: the real run-api, an unmodified BaseEnv
(atroposlib's ``sglang`` server type, through the gateway), verl's FSDP2 engine with PEFT, and
SGLang serving the base model plus the trainer's adapter (atropos_verl.serving.lora).

After every step only the adapter is synced, SGLang serves it under the new version's name, its
log-probs agree with the trainer's (the sync proof), and the environment's requests, which name
the base model, are answered by an adapter (SGLang's request log says which one served each).
"""

import re

import pytest
from engine_runs import assert_every_step_synced, train_with_engine

pytestmark = [pytest.mark.integration, pytest.mark.sglang, pytest.mark.slow]

STEPS = 3


@pytest.mark.timeout(900)
def test_lora_run_on_sglang_serves_each_steps_adapter(atropos_api, tiny_model, sglang_python, tmp_path):
    overrides = [
        f"engine.python={sglang_python}",
        "model.lora.rank=8",
        "model.lora.alpha=32",
        "trainer.batch_size=8",
        "actor.lr=1e-2",
        "engine.extra_args=[--log-requests]",
    ]
    run = train_with_engine("sglang", overrides, atropos_api.url, tiny_model, tmp_path, STEPS, server_types=("sglang",))

    assert "weight transport: lora_adapter" in run.trainer_log
    assert_every_step_synced(run.metrics, STEPS)
    # Step 1 trains on groups the base model sampled; PEFT's zero B makes the trainer's policy the
    # base model too. Later steps' groups carry no known version (the gateway's SGLang /generate
    # path records no lineage), so their sampler may be a policy behind: only the proof bounds them.
    assert run.metrics[0]["train/inference_logprob_abs_diff"] < 1e-3, run.metrics[0]
    for step in range(1, STEPS + 1):
        assert f"serving adapter policy-lora-v{step} (policy version {step})" in run.trainer_log
    engine_log = (run.run_dir / "engines" / "sglang-0.log").read_text()
    # The environment's batched requests (a list of adapters, one per prompt; the proof sends one
    # prompt) named a versioned adapter, though the environment asked for the base model.
    sampled_by = set(re.findall(r"lora_path=\['(policy-lora-v\d+)'", engine_log))
    assert sampled_by and sampled_by <= {f"policy-lora-v{v}" for v in range(1, STEPS + 1)}, sampled_by
