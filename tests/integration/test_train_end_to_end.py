"""End to end on CPU: real run-api, a real BaseEnv subprocess, `python -m atropos_verl.train`, verl FSDP2.

The scripted environment (tests/envs/scripted_env.py) sends multi-turn groups
with mid-sequence masks, token-level advantages, inference log-probs,
``set_advantage_to_zero`` and one invalid group. Every number asserted below is
derived here from what the environment sends, not from the trainer's code.
"""

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import REPO, spawn
from transformers import AutoModelForCausalLM, AutoTokenizer

from atropos_verl.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envs"))
import scripted_env  # noqa: E402

pytestmark = pytest.mark.integration

STEPS = 4
GRPO_EPS = 1e-6


def expected_step1_loss(model_path, tokenizer):
    """Step 1 trains only the score group (the invalid one is rejected): GRPO advantages
    [1, -1, 1, 0] (the last forced to zero), logits at temperature 0.7, token-mean over
    trained tokens, computed with a plain HF forward and log-softmax."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    group = scripted_env.build_group(tokenizer, "score")
    mean = sum(scripted_env.SCORES) / len(scripted_env.SCORES)
    std = (sum((s - mean) ** 2 for s in scripted_env.SCORES) / len(scripted_env.SCORES)) ** 0.5
    advantages = [(s - mean) / (std + GRPO_EPS) for s in scripted_env.SCORES]
    advantages[3] = 0.0
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask, advantage in zip(group["tokens"], group["masks"], advantages):
            logits = model(input_ids=torch.tensor([tokens])).logits[0] / scripted_env.SCORE_GROUP_TEMPERATURE
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(tokens)):
                if mask[t] != -100:
                    total += -advantage * logp[t - 1, tokens[t]].item()
                    count += 1
    return total / count


@pytest.mark.timeout(900)
def test_trainer_learns_from_a_real_environment(atropos_api, tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    run_dir = tmp_path / "run"
    trainer = spawn(
        [
            sys.executable,
            "-m",
            "atropos_verl.train",
            # The test starts its own environments.
            "data=atropos",
            f"model.path={tiny_model}",
            f"atropos.api_url={atropos_api.url}",
            "atropos.timeout=30",
            "atropos.batch_timeout=300",
            "trainer.device=cpu",
            "trainer.batch_size=8",
            "trainer.max_token_len=256",
            f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=2",
            f"trainer.run_dir={run_dir}",
            "trainer.logger=[]",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "actor.dtype=float32",
            "actor.lr=1e-3",
        ],
        tmp_path / "trainer.log",
    )
    env = spawn(
        [
            sys.executable,
            str(REPO / "tests" / "envs" / "scripted_env.py"),
            "serve",
            "--env.rollout_server_url",
            atropos_api.url,
            "--env.tokenizer_name",
            tiny_model,
            "--env.vocab_size",
            "49152",
        ],
        tmp_path / "env.log",
    )
    try:
        deadline = time.monotonic() + 600
        while trainer.running and time.monotonic() < deadline:
            assert env.running, (tmp_path / "env.log").read_text()[-3000:]
            time.sleep(1)
        trainer_log = (tmp_path / "trainer.log").read_text()
        assert trainer.returncode() == 0, trainer_log[-5000:]
    finally:
        env.stop(timeout_s=60)
        trainer.stop(timeout_s=60)

    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    trained_per_sequence = scripted_env.trained_tokens_per_sequence(tokenizer)

    first, rest = metrics[0], metrics[1:]
    # Step 1: the invalid group is rejected (named in the log) and only the score group trains.
    assert first["data/groups_rejected"] == 1
    assert "rejected group env=0/step=1/group=0: tokens[0]: token id 49157" in trainer_log
    assert "outside the vocabulary [0, 49152)" in trainer_log
    assert first["data/groups"] == 1
    assert first["batch/sequences"] == 4
    assert first["batch/trained_tokens"] == 4 * trained_per_sequence
    assert first["reward/mean"] == 0.5
    # Per-sequence advantages [1, -1, 1, 0]: every sequence has the same number of trained tokens.
    assert first["advantage/mean"] == pytest.approx(0.25, abs=1e-5)
    assert first["advantage/max"] == pytest.approx(1.0, abs=1e-5)
    assert first["advantage/min"] == pytest.approx(-1.0, abs=1e-5)
    assert first["advantage/env_provided_fraction"] == 0.0
    assert first["train/loss"] == pytest.approx(expected_step1_loss(tiny_model, tokenizer), rel=1e-4)

    for m in rest:
        # A score group ([1, -1, 1, 0]) and a token group (env advantages [5 -> clipped 3, -1, 0.5, -0.5]).
        assert m["data/groups"] == 2
        assert m["data/groups_rejected"] == 0
        assert m["batch/sequences"] == 8
        assert m["batch/trained_tokens"] == 8 * trained_per_sequence
        assert m["reward/mean"] == 0.5
        assert m["advantage/mean"] == pytest.approx((1 - 1 + 1 + 0 + 3 - 1 + 0.5 - 0.5) / 8, abs=1e-5)
        assert m["advantage/max"] == 3.0
        assert m["advantage/clipped_fraction"] == pytest.approx(1 / 8)
        assert m["advantage/env_provided_fraction"] == 0.5
        # The token group carries sampler log-probs of -2.0: the trainer reports its distance to them.
        assert m["train/inference_logprob_abs_diff"] > 0
    assert metrics[-1]["data/groups_rejected_total"] == 1

    # Steps 2..4 see identical batches, so each update must lower the loss on them.
    losses = [m["train/loss"] for m in rest]
    assert losses[0] > losses[1] > losses[2], losses

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    for step in (2, STEPS):
        actor_dir = checkpoints / f"global_step_{step}" / "actor"
        assert any(actor_dir.glob("model_world_size_1_rank_0.pt")), list(actor_dir.iterdir())
        assert any(actor_dir.glob("optim_world_size_1_rank_0.pt"))
        state = json.loads((checkpoints / f"global_step_{step}" / "trainer_state.json").read_text())
        assert state["step"] == step
