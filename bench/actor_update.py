"""Actor-update throughput: our verl FSDP2 training path vs a plain PyTorch loop, side by side.

Both paths train the same randomly initialised model shape on the same batch of
scored groups with the same advantage-weighted token loss; the script prints
step time, tokens/s, MFU and peak memory for each and their ratio.

    python bench/actor_update.py --shape qwen2.5-0.5b --device cuda          # H100
    python bench/actor_update.py --shape qwen2.5-0.5b --order interleaved    # H100, steps alternate
    python bench/actor_update.py --shape tiny --device cpu --batch 8 \\
        --prompt-len 16 --response-len 48 --micro-batch 4                      # CPU, ratio only

``--tokenizer`` is any tokenizer folder (default: the SmolLM2 tokenizer built by
``atropos_verl.assets``); only its files are used, the weights are random.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atropos_verl.advantages import token_advantages
from atropos_verl.batch import build_batch
from atropos_verl.config import AdvantageConfig, RunConfig
from atropos_verl.groups import GroupLimits, ScoredGroup, parse_group
from atropos_verl.loss import advantage_weighted_token_loss

# Dense bf16 peak used for MFU (H100 SXM).
PEAK_FLOPS = {"cuda": 989e12, "cpu": None}

SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
}
# --flag auto|true|false -> the config's null (auto) or a bool.
AUTO_OR_BOOL = {"auto": None, "true": True, "false": False}
VOCAB = {"tiny": None, "qwen2.5-0.5b": 151936, "qwen2.5-1.5b": 151936}


def make_model_dir(shape: str, tokenizer_dir: Path, out: Path) -> tuple[Path, int, int]:
    """A randomly initialised Qwen2 of the given shape; returns (folder, parameter count, vocab size)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = VOCAB[shape] or len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        torch_dtype="float32",
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters()), vocab


def make_groups(batch: int, group_size: int, prompt_len: int, response_len: int, vocab: int) -> list[ScoredGroup]:
    rng = np.random.default_rng(0)
    groups = []
    for g in range(batch // group_size):
        prompt = rng.integers(0, vocab, prompt_len).tolist()
        tokens, masks = [], []
        for _ in range(group_size):
            response = rng.integers(0, vocab, response_len).tolist()
            tokens.append(prompt + response)
            masks.append([-100] * prompt_len + response)
        raw = {"tokens": tokens, "masks": masks, "scores": rng.random(group_size).tolist()}
        groups.append(
            parse_group(raw, f"bench/{g}", GroupLimits(vocab_size=vocab, max_token_len=prompt_len + response_len))
        )
    return groups


def flops_per_step(n_params: int, shape: dict, seq_lens: list[int]) -> float:
    """6·N per token for the dense weights plus causal attention (forward + backward)."""
    dense = 6 * n_params * sum(seq_lens)
    attention = 6 * shape["num_hidden_layers"] * shape["hidden_size"] * sum(s * s for s in seq_lens)
    return float(dense + attention)


def plain_loop(model_dir: Path, groups, advantages, args):
    """A plain PyTorch update: bf16 autocast, fp32 weights and AdamW, gradient accumulation over micro-batches.

    Yields (seconds, loss) per step; its peak memory is this process' (``peak_gb``)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.gradient_checkpointing_disable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    sequences = [(t, m, a) for g, adv in zip(groups, advantages) for t, m, a in zip(g.tokens, g.masks, adv)]
    total_trained = sum(sum(1 for x in m[1:] if x != -100) for _, m, _ in sequences)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i in range(0, len(sequences), args.micro_batch):
            chunk = sequences[i : i + args.micro_batch]
            input_ids = torch.tensor([t for t, _, _ in chunk], device=device)
            adv = torch.tensor(np.stack([a for _, _, a in chunk]), device=device, dtype=torch.float32)
            mask = torch.tensor([[x != -100 for x in m] for _, m, _ in chunk], device=device, dtype=torch.float32)
            with autocast:
                logits = model(input_ids=input_ids).logits
            # Sum over the micro-batch divided by the batch's trained tokens = token-mean over the batch.
            loss = advantage_weighted_token_loss(logits, input_ids, adv, mask, reduction="sum") / total_trained
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(device)
        yield time.perf_counter() - start, step_loss


def peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _profiling_worker():
    """PolicyWorker plus one method: a training step under torch.profiler, returning its top-ops table."""
    from verl.single_controller.base.decorator import Dispatch, register

    from atropos_verl.policy.worker import PolicyWorker

    class ProfilingPolicyWorker(PolicyWorker):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def profile_train(self, data, rows: int = 25) -> str:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                self.train_mini_batch(data)
                torch.cuda.synchronize()
            by_device = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)
            by_host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            return f"-- by GPU time --\n{by_device}\n-- by CPU time --\n{by_host}"

    return ProfilingPolicyWorker


def run_config(args) -> RunConfig:
    """The trainer config of the verl path for the command line's workload (add_workload_arguments)."""
    cfg = RunConfig()
    cfg.trainer.device = args.device
    cfg.trainer.total_training_steps = args.steps
    cfg.trainer.n_gpus_per_node = args.gpus
    cfg.actor.dtype = args.dtype
    cfg.actor.lr = 1e-6
    cfg.actor.use_dynamic_bsz = args.dynamic_bsz
    cfg.model.use_remove_padding = {"auto": None, "packed": True, "padded": False}[args.layout]
    cfg.actor.reshard_after_forward = AUTO_OR_BOOL[args.reshard_after_forward]
    cfg.actor.wrap_layers = AUTO_OR_BOOL[args.wrap_layers]
    cfg.actor.fused_optimizer = AUTO_OR_BOOL[args.fused_optimizer]
    cfg.actor.micro_batch_size_per_gpu = args.micro_batch
    cfg.actor.max_token_len_per_gpu = args.micro_batch * (args.prompt_len + args.response_len)
    cfg.trainer.max_token_len = args.prompt_len + args.response_len
    cfg.validate()
    return cfg


def verl_path(model_dir: Path, groups, advantages, args):
    """Our Actor on the same model and batch; yields (seconds, loss, grad norm, worker peak GiB) per step."""
    from verl.utils import tensordict_utils as tu

    from atropos_verl.placement import node_placement
    from atropos_verl.policy.actor import Actor, resolve_device

    cfg = run_config(args)
    placement = node_placement(cfg.trainer, cfg.engine, resolve_device(cfg.trainer.device))
    if args.profile:
        actor = Actor(cfg, str(model_dir), placement, worker_cls=_profiling_worker())
    else:
        actor = Actor(cfg, str(model_dir), placement)
    try:
        if args.profile:
            batch, _ = build_batch(
                groups,
                advantages,
                reduction="token-mean",
                use_sampling_temperature=True,
                pad_to_multiple=actor.batch_multiple,
            )
            actor.train(batch)  # warm-up
            batch, _ = build_batch(
                groups,
                advantages,
                reduction="token-mean",
                use_sampling_temperature=True,
                pad_to_multiple=actor.batch_multiple,
            )
            tu.assign_non_tensor(batch, num_mini_batch=1, epochs=1, seed=0)
            print(actor.workers.profile_train(batch)[0])
        for _ in range(args.steps):
            batch, _ = build_batch(
                groups,
                advantages,
                reduction="token-mean",
                use_sampling_temperature=True,
                pad_to_multiple=actor.batch_multiple,
            )
            start = time.perf_counter()
            metrics = actor.train(batch)
            seconds = time.perf_counter() - start
            yield (
                seconds,
                metrics["train/loss"],
                metrics["train/grad_norm"],
                metrics.get("perf/max_memory_allocated_gb", float("nan")),
            )
    finally:
        actor.shutdown()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def report(name: str, times: list[float], tokens: int, flops: float, peak_gb: float, device: str) -> dict:
    # The first step includes one-off costs (allocator growth, kernel selection).
    measured = times[1:] if len(times) > 1 else times
    step = statistics.median(measured)
    peak_flops = PEAK_FLOPS[device]
    mfu = flops / step / peak_flops if peak_flops else float("nan")
    print(f"{name:<22} step {step:8.3f} s   {tokens / step:10.0f} tok/s   MFU {mfu:6.1%}   peak {peak_gb:6.1f} GiB")
    print(f"{'':<22} steps  {' '.join(f'{t:.3f}' for t in times)}")
    return {"step_s": step, "tokens_per_s": tokens / step, "mfu": mfu, "peak_gb": peak_gb}


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape, batch and verl-path settings, shared by the benches that train through the Actor."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=768)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--dynamic-bsz", action="store_true", help="verl dynamic batch size (token budget = micro-batch x length)"
    )
    parser.add_argument(
        "--layout",
        choices=["auto", "packed", "padded"],
        default="auto",
        help="micro-batch layout: verl's packed rows (remove padding) or padded rows",
    )
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--reshard-after-forward", choices=list(AUTO_OR_BOOL), default="auto")
    parser.add_argument(
        "--wrap-layers",
        choices=list(AUTO_OR_BOOL),
        default="auto",
        help="one FSDP2 unit per decoder layer (true) or for the whole model (false)",
    )
    parser.add_argument("--gpus", type=int, default=1, help="FSDP2 ranks of the verl path (the plain loop uses one)")
    parser.add_argument(
        "--fused-optimizer", choices=list(AUTO_OR_BOOL), default="auto", help="torch's fused AdamW (auto: on CUDA)"
    )


def workload(args, workdir: Path):
    """(model folder, parameter count, scored groups, their advantages) for the command line's workload."""
    if args.tokenizer is None:
        from atropos_verl.assets import tiny_llama

        args.tokenizer = tiny_llama()
    model_dir, n_params, vocab = make_model_dir(args.shape, args.tokenizer, workdir / "model")
    groups = make_groups(args.batch, args.group_size, args.prompt_len, args.response_len, vocab)
    advantages, _ = token_advantages(groups, AdvantageConfig())
    return model_dir, n_params, groups, advantages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one verl step (CUDA)")
    parser.add_argument(
        "--order",
        choices=["sequential", "interleaved"],
        default="sequential",
        help="interleaved: one step of each path in turn, both models resident on the GPU at once "
        "(needs memory for both), so that drift in the host's speed hits both alike",
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="actor-bench-"))
    try:
        model_dir, n_params, groups, advantages = workload(args, workdir)
        seq_lens = [len(t) for g in groups for t in g.tokens]
        tokens = sum(seq_lens)
        flops = flops_per_step(n_params, SHAPES[args.shape], seq_lens)
        print(
            f"shape {args.shape} ({n_params / 1e6:.0f}M params), {args.device}, {args.dtype}, batch {args.batch} x "
            f"{args.prompt_len}+{args.response_len} tokens, micro-batch {args.micro_batch}, {args.steps} steps"
        )
        verl = verl_path(model_dir, groups, advantages, args)
        plain = None if args.skip_plain else plain_loop(model_dir, groups, advantages, args)
        if plain is not None and args.order == "interleaved":
            verl_steps, plain_steps = map(list, zip(*zip(verl, plain)))
        else:
            # verl first: its Ray workers exit and return all GPU memory, whereas this
            # process keeps a CUDA context and allocator state after the plain loop.
            verl_steps, plain_steps = list(verl), list(plain or [])
        verl.close()
        results = {}
        times, losses, grad_norms, peaks = zip(*verl_steps)
        results["verl"] = report("atropos-verl (verl)", times, tokens, flops, max(peaks), args.device)
        print(f"{'':<22} losses {['%.5f' % x for x in losses]}")
        print(f"{'':<22} grad norms {['%.4f' % x for x in grad_norms]}")
        if plain_steps:
            times, losses = zip(*plain_steps)
            results["plain"] = report("plain PyTorch loop", times, tokens, flops, peak_gb(args.device), args.device)
            print(f"{'':<22} losses {['%.5f' % x for x in losses]}")
            ratio = results["verl"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
            memory = results["verl"]["peak_gb"] / results["plain"]["peak_gb"]
            print(f"throughput ratio (atropos-verl / plain): {ratio:.2f}x   peak-memory ratio: {memory:.2f}x")
            if args.order == "interleaved":
                paired = statistics.median(p[0] / v[0] for v, p in zip(verl_steps[1:], plain_steps[1:]))
                print(
                    f"median of per-step ratios (each verl step against the plain step right after it): {paired:.2f}x"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
