"""verl's config keys on our command line: name the key that means the same here, or the closest one.

``python -m atropos_verl.train actor_rollout_ref.actor.optim.lr=1e-5`` would otherwise
get Hydra's "Key 'actor_rollout_ref' is not in struct". :func:`unknown_override`
checks the command line's overrides before Hydra composes anything and returns one
line naming our key (and how its unit differs, where it does), or the nearest keys
of ours for a misspelling. The same table is the README's "verl keys" section.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional

from atropos_verl.config import RunConfig

# verl 0.9.1 key -> (our key or group choice, how the meaning differs; "" when it is the same).
VERL_KEYS: dict[str, tuple[str, str]] = {
    "actor_rollout_ref.model.path": ("model.path", ""),
    "actor_rollout_ref.model.trust_remote_code": ("model.trust_remote_code", ""),
    "actor_rollout_ref.model.enable_gradient_checkpointing": ("model.enable_gradient_checkpointing", ""),
    "actor_rollout_ref.model.use_remove_padding": ("model.use_remove_padding", "null: on with flash attention"),
    "actor_rollout_ref.actor.strategy": ("actor.strategy", "fsdp2 only"),
    "actor_rollout_ref.actor.optim.lr": ("actor.lr", ""),
    "actor_rollout_ref.actor.optim.weight_decay": ("actor.weight_decay", ""),
    "actor_rollout_ref.actor.optim.betas": ("actor.betas", ""),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": ("actor.lr_warmup_steps", ""),
    "actor_rollout_ref.actor.optim.lr_scheduler_type": ("actor.lr_scheduler_type", "constant or cosine"),
    "actor_rollout_ref.actor.grad_clip": ("actor.clip_grad", ""),
    "actor_rollout_ref.actor.ppo_mini_batch_size": (
        "actor.num_mini_batches",
        "a count of optimizer steps per batch, not a size: verl's train_batch_size / ppo_mini_batch_size",
    ),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": ("actor.micro_batch_size_per_gpu", ""),
    "actor_rollout_ref.actor.use_dynamic_bsz": ("actor.use_dynamic_bsz", ""),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": ("actor.max_token_len_per_gpu", ""),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": ("actor.ulysses_sequence_parallel_size", ""),
    "actor_rollout_ref.actor.use_torch_compile": ("actor.use_torch_compile", ""),
    "actor_rollout_ref.actor.clip_ratio": (
        "loss.clip_ratio",
        "against the environments' inference_logprobs; null (off) by default",
    ),
    "actor_rollout_ref.actor.loss_agg_mode": (
        "loss.reduction",
        "token-mean is verl's token-mean; sequence-mean is seq-mean-token-mean; sum is a plain sum",
    ),
    "actor_rollout_ref.actor.fsdp_config.param_offload": ("actor.param_offload", ""),
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": ("actor.optimizer_offload", ""),
    "actor_rollout_ref.actor.fsdp_config.fsdp_size": ("actor.fsdp_size", ""),
    "actor_rollout_ref.actor.fsdp_config.reshard_after_forward": ("actor.reshard_after_forward", ""),
    "actor_rollout_ref.rollout.name": ("engine", "a config group: engine=vllm or engine=sglang"),
    "actor_rollout_ref.rollout.tensor_model_parallel_size": ("engine.tensor_parallel_size", ""),
    "actor_rollout_ref.rollout.gpu_memory_utilization": ("engine.gpu_memory_utilization", ""),
    "actor_rollout_ref.rollout.max_model_len": ("engine.max_model_len", ""),
    "actor_rollout_ref.rollout.free_cache_engine": ("engine.sleep_during_training", ""),
    "actor_rollout_ref.rollout.n": ("data.group_size", "or --env.group_size in an environment's args"),
    "actor_rollout_ref.rollout.temperature": ("data.temperature", "or --env.temperature in an environment's args"),
    "data.train_batch_size": (
        "trainer.batch_size",
        "counts sequences, not prompts: verl's train_batch_size x actor_rollout_ref.rollout.n",
    ),
    "data.train_files": ("data.path", "with a data= group: data=parquet, jsonl, gsm8k, math, ..."),
    "data.val_files": ("data.eval_path", ""),
    "data.prompt_key": ("data.prompt_field", ""),
    "algorithm.adv_estimator": ("advantage", "a config group: advantage=grpo, dr_grpo, batch_norm or raw"),
    "algorithm.norm_adv_by_std_in_grpo": ("advantage.scale_by_std", ""),
    "custom_reward_function.path": ("data.reward_fn", "package.module:function"),
    "custom_reward_function.name": ("data.reward_fn", "package.module:function"),
    "trainer.default_local_dir": ("trainer.run_dir", "or trainer.run_name for runs/<experiment>/<name>"),
    "trainer.max_actor_ckpt_to_keep": ("trainer.max_ckpt_to_keep", ""),
    "trainer.resume_mode": ("trainer.resume", "auto or disable"),
    "trainer.resume_from_path": ("trainer.resume_from", ""),
    "trainer.total_epochs": ("trainer.total_training_steps", "environments stream data: steps, not epochs"),
}

# The choosable config groups (atropos_verl/conf/ and the test search path): `model=tiny` picks one.
GROUPS = ("model", "engine", "data", "advantage", "experiment")
# key=value, +key=value, ++key=value or ~key (Hydra's own flags start with "-" and are skipped).
_OVERRIDE = re.compile(r"^(?:\+\+|\+)?([A-Za-z_][\w.\-]*)=|^~([A-Za-z_][\w.\-]*)")


def our_keys() -> list[str]:
    """Every ``section.field`` of :class:`RunConfig`."""
    keys = []
    for section in dataclasses.fields(RunConfig):
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(section.default_factory())]
    return keys


def _known(key: str, keys: set[str]) -> bool:
    parts = key.split(".")
    if (parts[0] in GROUPS and len(parts) == 1) or parts[0] == "hydra":
        return True
    # Below a field (data.envs.0.args...) the schema is the field's own business.
    return ".".join(parts[:2]) in keys


def unknown_override(args: list[str]) -> Optional[str]:
    """The first override naming no key of ours, explained in one line; None when all are known."""
    keys = our_keys()
    known = set(keys)
    for arg in args:
        match = _OVERRIDE.match(arg)
        if match is None:
            continue
        key = match.group(1) or match.group(2)
        if _known(key, known):
            continue
        value = arg.split("=", 1)[1] if "=" in arg else "..."
        if key in VERL_KEYS:
            ours, note = VERL_KEYS[key]
            # Where the meaning differs the value may not carry over as it is: no ready override then.
            said = f"the nearest here is {ours} ({note})" if note else f"here it is {ours}: {ours}={value}"
            return f"{key} is verl's key; {said}. README.md, 'verl keys', maps the others"
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if close:
            return f"{key} is not a key of this config; did you mean {' or '.join(close)}? (--cfg job prints them all)"
    return None
