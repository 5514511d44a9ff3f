"""LoRA through the real ``Actor`` (Ray + verl ``TrainingWorker`` + FSDP2 + PEFT on CPU).

Two optimizer steps with a learning rate large enough to move the adapter; then, read back
from the worker's own FSDP2 module: every base weight is bit-identical to the model on disk,
the adapter moved; the exported PEFT folder, opened by PEFT on the base model, gives the
trainer's log-probs; the checkpoint holds only the adapter, and its export merges into a model
with the same log-probs.
"""

import json
import sys

import numpy as np
import pytest
import ray.cloudpickle
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from verl.single_controller.base.decorator import Dispatch, register

from atropos_verl.advantages import token_advantages
from atropos_verl.batch import build_batch
from atropos_verl.checkpoint import CheckpointDir, Progress
from atropos_verl.config import AdvantageConfig, RunConfig
from atropos_verl.groups import GroupLimits, parse_group
from atropos_verl.lora_export import export
from atropos_verl.placement import CPU_PLACEMENT
from atropos_verl.policy.actor import Actor
from atropos_verl.policy.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_ADAPTER
from atropos_verl.policy.worker import PolicyWorker

pytestmark = pytest.mark.integration


class InspectedWorker(PolicyWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def module_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter of the engine's (PEFT, FSDP2) module in full, under PEFT's module names."""
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for name, p in self.engine.module.named_parameters()
        }


# The worker class travels to Ray by value: its module (this test) is not importable there.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def group(vocab_size, seed):
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, vocab_size, n).tolist() for n in (9, 14, 6, 11)]
    masks = [[-100] * 3 + seq[3:] for seq in tokens]
    raw = {"tokens": tokens, "masks": masks, "scores": [1.0, 0.0, 0.5, 0.25]}
    return parse_group(raw, f"g{seed}", GroupLimits(vocab_size=vocab_size, max_token_len=64))


def base_name(peft_name):
    """PEFT's name of a wrapped weight → the model's own (base_model.model.X.base_layer.weight → X.weight)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def log_probs_of(model, sequences):
    """Entry t: log p(token t+1 | tokens up to t), as Actor.log_probs gives them (the last entry is unused)."""
    rows = []
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
            rows.append([logp[t, seq[t + 1]].item() for t in range(len(seq) - 1)])
    return rows


def max_abs_diff(a_rows, b_rows):
    return max(abs(a - b) for a_row, b_row in zip(a_rows, b_rows) for a, b in zip(a_row, b_row))


@pytest.mark.timeout(600)
def test_lora_trains_only_the_adapter_and_exports_it(tiny_model, tmp_path):
    cfg = RunConfig()
    cfg.trainer.device = "cpu"
    cfg.trainer.ray_num_cpus = 2
    cfg.actor.dtype = "float32"
    cfg.actor.lr = 1e-2
    cfg.model.lora.rank = 8
    cfg.model.lora.alpha = 16
    # verl passes PEFT no dropout: atropos_verl.policy.lora adds it (off when log-probs are computed).
    cfg.model.lora.dropout = 0.05
    cfg.validate()
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    original_weights = dict(original.named_parameters())
    actor = Actor(cfg, tiny_model, CPU_PLACEMENT, worker_cls=InspectedWorker)
    try:
        before = actor.workers.module_weights()[0]
        for seed in (0, 1):
            scored = group(original.config.vocab_size, seed)
            advantages, _ = token_advantages([scored], AdvantageConfig(clip=None))
            batch, _ = build_batch(
                [scored], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=1
            )
            metrics = actor.train(batch)
            assert metrics["train/grad_norm"] > 0
        after = actor.workers.module_weights()[0]

        adapter = {name for name in after if ".lora_" in name}
        assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
        for name in adapter:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        base = set(after) - adapter
        assert len(base) == len(original_weights)
        for name in base:
            assert torch.equal(after[name], before[name]), f"base weight {name} changed"
            assert torch.equal(after[name], original_weights[base_name(name)].detach()), name

        probe = [scored.tokens[0], scored.tokens[1]]
        trainer_log_probs = [row[: len(seq) - 1] for row, seq in zip(actor.log_probs(probe), probe)]
        # LoRA B starts at zero: an adapter that moved changes the policy.
        assert max_abs_diff(trainer_log_probs, log_probs_of(original, probe)) > 1e-4

        checkpoints = CheckpointDir(tmp_path / "checkpoints", None)
        actor.save_checkpoint(str(checkpoints.actor_dir(2)), 2)
        checkpoints.commit(Progress(step=2))
    finally:
        actor.shutdown()

    actor_dir = checkpoints.actor_dir(2)
    shard = torch.load(actor_dir / "model_world_size_1_rank_0.pt", map_location="cpu", weights_only=False)
    assert shard and all("lora_" in name for name in shard), "the checkpoint holds more than the adapter"
    saved = load_file(actor_dir / CHECKPOINT_ADAPTER / ADAPTER_WEIGHTS)
    assert len(saved) == len(adapter)
    adapter_config = json.loads((actor_dir / CHECKPOINT_ADAPTER / ADAPTER_CONFIG).read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (8, 16, 0.05)

    from peft import PeftModel

    adapter_dir = export(tmp_path, tmp_path / "adapter", merged=False)
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapter_dir)
    )
    assert max_abs_diff(trainer_log_probs, log_probs_of(with_adapter, probe)) < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(export(tmp_path, tmp_path / "merged", merged=True))
    assert max_abs_diff(trainer_log_probs, log_probs_of(merged, probe)) < 1e-4
