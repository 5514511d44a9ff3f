"""The loss inside verl's FSDP2 engine is the public advantage-weighted token loss.

One batch goes through the real ``Actor`` (Ray + verl ``TrainingWorker`` +
FSDP2 on CPU) in three layouts: one rank with one micro-batch, one rank with
many micro-batches, and two data-parallel ranks. Each must report the loss and
the pre-clipping gradient norm of a plain Hugging Face forward/backward of
:func:`advantage_weighted_token_loss` on the same weights: that pins the
shifted layout, per-sample temperature, and the normalisation across
micro-batches and ranks.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from atropos_verl.actor import Actor
from atropos_verl.batch import build_batch
from atropos_verl.config import RunConfig
from atropos_verl.groups import GroupLimits, parse_group
from atropos_verl.loss import advantage_weighted_token_loss

pytestmark = pytest.mark.integration

TEMPERATURES = [1.0, 0.7, 1.3, 1.0]


def scripted_groups(vocab_size):
    rng = np.random.default_rng(0)
    lengths = [9, 14, 6, 11]
    tokens = [rng.integers(0, vocab_size, n).tolist() for n in lengths]
    masks = []
    for seq in tokens:
        mask = list(seq)
        mask[:3] = [-100] * 3  # prompt
        mask[len(seq) // 2] = -100  # a masked token in the middle
        masks.append(mask)
    advantages = [rng.normal(size=n).round(3).tolist() for n in lengths]
    raw = {
        "tokens": tokens,
        "masks": masks,
        "scores": [1.0, 0.0, 0.5, 0.25],
        "advantages": advantages,
        "overrides": [{"temperature": t} for t in TEMPERATURES],
    }
    group = parse_group(raw, "g", GroupLimits(vocab_size=vocab_size, max_token_len=64))
    return group


def reference(model_path, group):
    """Loss and gradient norm from a plain HF forward/backward of the public function."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    width = max(len(t) for t in group.tokens)
    input_ids = torch.zeros(len(group.tokens), width, dtype=torch.long)
    advantages = torch.zeros(len(group.tokens), width)
    loss_mask = torch.zeros(len(group.tokens), width)
    logits = []
    for i, seq in enumerate(group.tokens):
        n = len(seq)
        input_ids[i, :n] = torch.tensor(seq)
        advantages[i, :n] = torch.tensor(group.advantages[i])
        loss_mask[i, :n] = torch.tensor([m != -100 for m in group.masks[i]], dtype=torch.float32)
        out = model(input_ids=torch.tensor([seq])).logits[0] / TEMPERATURES[i]
        logits.append(torch.nn.functional.pad(out, (0, 0, 0, width - n)))
    loss = advantage_weighted_token_loss(torch.stack(logits), input_ids, advantages, loss_mask)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), grad_norm.item()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "ranks, max_token_len_per_gpu, remove_padding",
    [(1, 4096, True), (1, 16, True), (2, 16, True), (1, 16, False), (2, 16, False)],
    ids=["one-rank", "micro-batches", "two-ranks", "padded-micro-batches", "padded-two-ranks"],
)
def test_engine_loss_and_gradient_match_reference(tiny_model, ranks, max_token_len_per_gpu, remove_padding):
    from atropos_verl.advantages import token_advantages
    from atropos_verl.config import AdvantageConfig

    cfg = RunConfig()
    cfg.trainer.device = "cpu"
    cfg.trainer.n_gpus_per_node = ranks
    cfg.trainer.ray_num_cpus = 2
    cfg.actor.dtype = "float32"
    cfg.actor.lr = 1e-12
    cfg.actor.clip_grad = 1e9
    cfg.actor.max_token_len_per_gpu = max_token_len_per_gpu
    cfg.model.use_remove_padding = remove_padding
    cfg.validate()

    group = scripted_groups(vocab_size=49152)
    advantages, _ = token_advantages([group], AdvantageConfig(clip=None))
    want_loss, want_grad_norm = reference(tiny_model, group)

    actor = Actor(cfg, tiny_model)
    try:
        batch, _ = build_batch([group], advantages, reduction="token-mean", use_sampling_temperature=True, pad_to_multiple=actor.batch_multiple)
        metrics = actor.train(batch)
    finally:
        actor.shutdown()
    assert metrics["train/loss"] == pytest.approx(want_loss, rel=1e-4)
    assert metrics["train/grad_norm"] == pytest.approx(want_grad_norm, rel=1e-3)
