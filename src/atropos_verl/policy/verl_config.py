"""Our typed config → verl's ``TrainingWorkerConfig`` (model, FSDP2 engine, optimizer, checkpoints)."""

from __future__ import annotations

from verl.trainer.config import CheckpointConfig
from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, TrainingWorkerConfig

from atropos_verl.config import RunConfig, compute_dtype

WHOLE_MODEL = {"disable": True, "transformer_layer_cls_to_wrap": ["<whole model>"]}


def uses_fused_optimizer(cfg: RunConfig, device: str) -> bool:
    if cfg.actor.fused_optimizer is not None:
        return cfg.actor.fused_optimizer
    return device == "cuda" and not cfg.actor.param_offload


def training_worker_config(cfg: RunConfig, model_path: str, device: str) -> TrainingWorkerConfig:
    """Translate our typed config into verl's engine, optimizer and model configs."""
    actor = cfg.actor
    precision = "bf16" if compute_dtype(actor, device) == "bfloat16" else "fp32"
    wrap_layers = cfg.trainer.world_size > 1 if actor.wrap_layers is None else actor.wrap_layers
    lora = cfg.model.lora
    model = HFModelConfig(
        path=model_path,
        tokenizer_path=cfg.model.tokenizer_path,
        trust_remote_code=cfg.model.trust_remote_code,
        override_config={"attn_implementation": cfg.model.attn_implementation},
        enable_gradient_checkpointing=cfg.model.enable_gradient_checkpointing,
        use_remove_padding=cfg.model.remove_padding or actor.ulysses_sequence_parallel_size > 1,
        use_fused_kernels=actor.use_fused_kernels,
        # verl's PEFT path (rank 0: none). Its FSDP engine reads only "merge" from the ``lora`` dict;
        # the dropout, which verl does not pass to PEFT, rides there to atropos_verl.policy.lora.
        lora_rank=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=lora.peft_target_modules,
        lora={"dropout": lora.dropout} if lora.enabled else {},
    )
    engine = FSDPEngineConfig(
        strategy=actor.strategy,
        param_offload=actor.param_offload,
        optimizer_offload=actor.optimizer_offload,
        use_dynamic_bsz=actor.use_dynamic_bsz,
        max_token_len_per_gpu=actor.max_token_len_per_gpu,
        micro_batch_size_per_gpu=actor.micro_batch_size_per_gpu,
        infer_max_token_len_per_gpu=actor.max_token_len_per_gpu,
        infer_micro_batch_size_per_gpu=actor.micro_batch_size_per_gpu,
        ulysses_sequence_parallel_size=actor.ulysses_sequence_parallel_size,
        fsdp_size=actor.fsdp_size,
        reshard_after_forward=(
            cfg.trainer.world_size > 1 if actor.reshard_after_forward is None else actor.reshard_after_forward
        ),
        model_dtype="fp32",
        mixed_precision={"param_dtype": precision, "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        wrap_policy={} if wrap_layers else WHOLE_MODEL,
        use_torch_compile=actor.use_torch_compile,
        seed=actor.seed,
    )
    optimizer = FSDPOptimizerConfig(
        lr=actor.lr,
        weight_decay=actor.weight_decay,
        betas=tuple(actor.betas),
        clip_grad=actor.clip_grad,
        lr_warmup_steps=actor.lr_warmup_steps,
        lr_scheduler_type=actor.lr_scheduler_type,
        total_training_steps=cfg.trainer.total_training_steps * actor.num_mini_batches,
        override_optimizer_config={"fused": uses_fused_optimizer(cfg, device)},
    )
    return TrainingWorkerConfig(
        model_type="language_model",
        model_config=model,
        engine_config=engine,
        optimizer_config=optimizer,
        # A LoRA checkpoint holds the adapter (and its optimizer state), not another copy of the base model.
        checkpoint_config=CheckpointConfig(save_lora_only=lora.enabled),
    )
