"""Typed configuration of a training run.

Hydra composes the YAML groups under ``conf/``; :func:`load_config` merges the
result onto these dataclasses, so an unknown key or a wrong type fails at
start-up with OmegaConf's message naming the full key, and :meth:`validate`
checks the values that types alone cannot (ranges, divisibility, choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    # A Hugging Face hub id, a local folder, or ``builtin:<name>`` for the models
    # this project builds from registry packages (see atropos_verl.assets).
    path: str = "builtin:tiny-llama"
    tokenizer_path: Optional[str] = None
    trust_remote_code: bool = False
    # flash_attention_2 needs flash-attn; sdpa runs everywhere.
    attn_implementation: str = "sdpa"
    enable_gradient_checkpointing: bool = False
    # Pack each micro-batch into one row (verl's remove padding). null = auto: on with flash
    # attention (its varlen kernel is the fast path; Ulysses needs it), off with SDPA/eager,
    # where packing turns causal attention into a block mask over the whole micro-batch
    # (measured on an H100 in bench/RESULTS.md).
    use_remove_padding: Optional[bool] = None

    @property
    def remove_padding(self) -> bool:
        if self.use_remove_padding is None:
            return self.attn_implementation.startswith("flash_attention")
        return self.use_remove_padding

    def validate(self) -> None:
        _require(bool(self.path), "model.path", "must name a hub id, a local folder or builtin:<name>")
        _require(
            self.attn_implementation in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"),
            "model.attn_implementation",
            f"unknown value {self.attn_implementation!r}",
        )


@dataclass
class AtroposConfig:
    api_url: str = "http://127.0.0.1:8000"
    # Seconds start-up waits for the API before failing (the seed's atropos.timeout).
    timeout: float = 60.0
    request_timeout: float = 30.0
    poll_interval: float = 0.2
    max_poll_interval: float = 5.0
    # Give up when no batch arrives for this long (null waits forever).
    batch_timeout: Optional[float] = 1800.0
    max_retries: int = 5
    # A second trainer registering does not reset the API; allow wiping its state.
    reset_on_mismatch: bool = False
    # auto: start run-api at api_url when nothing answers there (loopback URLs only);
    # always: start it (the port must be free); never: it must already run.
    start_api: str = "auto"
    # Seconds without a batch after which the periodic "why no batch" line also suggests a fix.
    starvation_hint_after: float = 300.0
    wandb_group: str = "atropos-verl"
    wandb_project: str = "atropos-verl"

    def validate(self) -> None:
        _require(
            self.api_url.startswith(("http://", "https://")), "atropos.api_url", f"not an http(s) URL: {self.api_url!r}"
        )
        _require(self.timeout > 0, "atropos.timeout", f"must be > 0, got {self.timeout}")
        _require(self.request_timeout > 0, "atropos.request_timeout", f"must be > 0, got {self.request_timeout}")
        _require(self.poll_interval > 0, "atropos.poll_interval", f"must be > 0, got {self.poll_interval}")
        _require(
            self.max_poll_interval >= self.poll_interval,
            "atropos.max_poll_interval",
            f"must be >= atropos.poll_interval ({self.poll_interval}), got {self.max_poll_interval}",
        )
        _require(self.batch_timeout is None or self.batch_timeout > 0, "atropos.batch_timeout", "must be > 0 or null")
        _require(self.max_retries >= 0, "atropos.max_retries", f"must be >= 0, got {self.max_retries}")
        _require(
            self.start_api in ("auto", "always", "never"),
            "atropos.start_api",
            f"must be auto, always or never, got {self.start_api!r}",
        )
        _require(self.starvation_hint_after >= 0, "atropos.starvation_hint_after", "must be >= 0")


NORMALIZATIONS = ("group", "batch", "none")


@dataclass
class AdvantageConfig:
    # Where score-derived advantages are centred (and scaled): within each group
    # (GRPO), across the whole batch, or not at all (raw scores).
    normalization: str = "group"
    # Divide by the standard deviation after centring (false: Dr. GRPO style).
    scale_by_std: bool = True
    eps: float = 1e-6
    # [low, high] applied to every final advantage, or null for no clipping.
    clip: Optional[list[float]] = field(default_factory=lambda: [-3.0, 3.0])
    # Token-level advantages sent by an environment replace score-derived ones.
    use_env_advantages: bool = True

    def validate(self) -> None:
        _require(
            self.normalization in NORMALIZATIONS,
            "advantage.normalization",
            f"must be one of {NORMALIZATIONS}, got {self.normalization!r}",
        )
        _require(self.eps > 0, "advantage.eps", f"must be > 0, got {self.eps}")
        if self.clip is not None:
            _require(len(self.clip) == 2, "advantage.clip", f"must be [low, high] or null, got {self.clip}")
            _require(self.clip[0] < self.clip[1], "advantage.clip", f"low must be < high, got {self.clip}")


REDUCTIONS = ("token-mean", "sequence-mean", "sum")


@dataclass
class LossConfig:
    # token-mean: sum(-A*m*logp)/sum(m) over the mini-batch (all DP ranks);
    # sequence-mean: mean over sequences of each sequence's token mean; sum: no normalisation.
    reduction: str = "token-mean"
    # PPO-style ratio clip against the env's inference_logprobs (null: plain
    # advantage-weighted cross-entropy, which is what on-policy data needs).
    clip_ratio: Optional[float] = None
    # Scale logits by each sequence's sampling temperature before log-softmax,
    # so trainer log-probs are comparable with the sampler's.
    use_sampling_temperature: bool = True

    def validate(self) -> None:
        _require(self.reduction in REDUCTIONS, "loss.reduction", f"must be one of {REDUCTIONS}, got {self.reduction!r}")
        _require(
            self.clip_ratio is None or 0 < self.clip_ratio < 1,
            "loss.clip_ratio",
            f"must be in (0, 1) or null, got {self.clip_ratio}",
        )


@dataclass
class ActorConfig:
    """verl FSDP2 training engine settings (verl's names where they exist)."""

    strategy: str = "fsdp2"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    # Compute dtype. bfloat16 keeps fp32 master weights and runs matmuls in bf16.
    dtype: str = "bfloat16"
    ulysses_sequence_parallel_size: int = 1
    fsdp_size: int = -1
    # FSDP2 frees gathered parameters after each layer's forward (ZeRO-3); false keeps them
    # until backward, trading memory for fewer all-gathers. null = auto: false on a single
    # rank (nothing is sharded, the regather is pure overhead), true otherwise.
    reshard_after_forward: Optional[bool] = None
    # One FSDP2 unit per decoder layer, so each layer's gather and reduce overlap the others'
    # compute across ranks; false makes the whole model one unit. null = auto: per layer with
    # several ranks, one unit on a single rank (nothing to overlap, and every unit's hooks cost
    # host time at each micro-batch: measured on an H100 in bench/RESULTS.md).
    wrap_layers: Optional[bool] = None
    param_offload: bool = False
    optimizer_offload: bool = False
    # torch's fused AdamW (one kernel launch for all parameters instead of a dozen per-op
    # launches, each through DTensor dispatch). null = auto: on CUDA unless parameters are
    # offloaded to the CPU, where the fused kernel cannot run.
    fused_optimizer: Optional[bool] = None
    use_dynamic_bsz: bool = True
    max_token_len_per_gpu: int = 16384
    micro_batch_size_per_gpu: int = 4
    # Optimizer steps per Atropos batch (PPO-style mini-batches over one batch).
    num_mini_batches: int = 1
    use_torch_compile: bool = False
    use_fused_kernels: bool = False
    seed: int = 42

    def validate(self) -> None:
        _require(self.strategy == "fsdp2", "actor.strategy", f"only fsdp2 is supported, got {self.strategy!r}")
        _require(self.lr > 0, "actor.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2, "actor.betas", f"must be [beta1, beta2], got {self.betas}")
        _require(self.clip_grad > 0, "actor.clip_grad", f"must be > 0, got {self.clip_grad}")
        _require(
            self.dtype in ("bfloat16", "float32"), "actor.dtype", f"must be bfloat16 or float32, got {self.dtype!r}"
        )
        _require(
            self.lr_scheduler_type in ("constant", "cosine"), "actor.lr_scheduler_type", "must be constant or cosine"
        )
        _require(self.ulysses_sequence_parallel_size >= 1, "actor.ulysses_sequence_parallel_size", "must be >= 1")
        _require(self.max_token_len_per_gpu > 0, "actor.max_token_len_per_gpu", "must be > 0")
        _require(self.micro_batch_size_per_gpu > 0, "actor.micro_batch_size_per_gpu", "must be > 0")
        _require(self.num_mini_batches >= 1, "actor.num_mini_batches", "must be >= 1")
        _require(
            not (self.fused_optimizer and self.param_offload),
            "actor.fused_optimizer",
            "cannot be true with actor.param_offload: the fused kernel needs the parameters on the GPU",
        )


ENGINE_KINDS = ("external", "vllm", "sglang")


@dataclass
class EngineConfig:
    """Inference replicas that serve the policy to environments, behind one gateway.

    ``external``: environments bring their own inference servers; the trainer
    trains and checkpoints but pushes weights nowhere. ``vllm`` / ``sglang``: the
    trainer starts ``replicas`` servers, a gateway in front of them, and syncs
    weights into every replica after each step.
    """

    kind: str = "external"
    replicas: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 2048
    # Engine compute dtype; auto follows the model's config.
    dtype: str = "auto"
    # Free accelerator memory while the trainer trains (colocated GPUs).
    sleep_during_training: bool = False
    startup_timeout: float = 900.0
    extra_args: list[str] = field(default_factory=list)
    gateway_host: str = "127.0.0.1"
    # Fixed port for environments to point at (null: a free port, logged at start).
    gateway_port: Optional[int] = None
    # More ports the gateway also answers on. An environment whose config_init returns a
    # single APIServerConfig ignores its base_url and calls localhost:9004-9007 (an
    # atroposlib quirk): [9004, 9005, 9006, 9007] serves it unmodified.
    gateway_extra_ports: list[int] = field(default_factory=list)
    # Name of the environment variable holding the gateway's bearer token (the token
    # itself never sits in the config, so it cannot leak into logs or --cfg job).
    api_key_env: Optional[str] = None
    # Seconds a request may wait for a sync to finish before the gateway answers 503.
    max_wait: float = 300.0
    drain_timeout: float = 60.0
    sync_bucket_mb: int = 512
    # Mean |trainer - engine| log-prob on the probe above which the run stops (null: only log).
    sync_check_threshold: Optional[float] = 0.05
    sync_probe_sequences: int = 2
    # A replica failing this many health checks in a row, health_interval seconds apart,
    # is restarted and given the current weights before it serves again.
    health_interval: float = 10.0
    health_failures: int = 3

    def validate(self) -> None:
        _require(self.kind in ENGINE_KINDS, "engine.kind", f"must be one of {ENGINE_KINDS}, got {self.kind!r}")
        _require(self.replicas >= 1, "engine.replicas", f"must be >= 1, got {self.replicas}")
        _require(self.tensor_parallel_size >= 1, "engine.tensor_parallel_size", "must be >= 1")
        _require(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization", "must be in (0, 1]")
        _require(self.max_model_len >= 2, "engine.max_model_len", f"must be >= 2, got {self.max_model_len}")
        _require(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "engine.dtype",
            f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )
        _require(self.startup_timeout > 0, "engine.startup_timeout", "must be > 0")
        _require(self.max_wait > 0, "engine.max_wait", "must be > 0")
        _require(self.drain_timeout > 0, "engine.drain_timeout", "must be > 0")
        _require(self.sync_bucket_mb >= 1, "engine.sync_bucket_mb", "must be >= 1")
        _require(
            self.sync_check_threshold is None or self.sync_check_threshold > 0,
            "engine.sync_check_threshold",
            "must be > 0 or null",
        )
        _require(self.sync_probe_sequences >= 0, "engine.sync_probe_sequences", "must be >= 0")
        _require(self.health_interval > 0, "engine.health_interval", "must be > 0")
        _require(self.health_failures >= 1, "engine.health_failures", "must be >= 1")


ENV_SERVER_TYPES = ("vllm", "sglang", "openai")


@dataclass
class EnvSpec:
    """One Atropos environment the trainer starts and supervises.

    It runs as ``python -m <module> serve ...`` (or ``python <script> serve ...``)
    with the API URL, tokenizer, and (when the trainer runs the engines) the
    gateway URL, model name and server type injected as ``--env.*`` /
    ``--openai.*`` flags; ``args`` are appended last, so they win.
    """

    name: str = "env"
    module: Optional[str] = None
    script: Optional[str] = None
    args: list[str] = field(default_factory=list)
    replicas: int = 1
    # What the environment's inference client speaks (its APIServerConfig.server_type).
    server_type: str = "vllm"

    def validate(self, key: str) -> None:
        _require(bool(self.name), f"{key}.name", "must not be empty")
        _require(
            (self.module is None) != (self.script is None),
            key,
            f"environment {self.name!r} needs exactly one of module or script",
        )
        _require(self.replicas >= 1, f"{key}.replicas", f"must be >= 1, got {self.replicas}")
        _require(
            self.server_type in ENV_SERVER_TYPES,
            f"{key}.server_type",
            f"must be one of {ENV_SERVER_TYPES}, got {self.server_type!r}",
        )


DATASET_ENV_MODULE = "atropos_verl.envs.dataset"


@dataclass
class DataConfig:
    """Where scored groups come from: environments connected to atropos.api_url.

    ``envs`` lists environments the trainer starts itself; others may connect on their own.
    The dataset groups (``data=gsm8k|math|hellaswag|parquet|jsonl``) start the dataset
    environment and hand it the keys below through ``${data.*}`` in ``envs[].args``;
    ``data=atropos`` ignores them. Empty strings and 0 mean "not set".
    """

    source: str = "atropos"
    envs: list[EnvSpec] = field(default_factory=list)
    # An environment that exits is restarted after restart_backoff x 2^n seconds, at most
    # max_restarts times in a row (a run of healthy uptime resets the count).
    max_restarts: int = 5
    restart_backoff: float = 2.0
    # Hub dataset name, or a local .jsonl/.json/.parquet file or a folder of them.
    path: str = ""
    split: str = "train"
    # Held-out data scored greedily every few steps ("": no evaluation).
    eval_path: str = ""
    eval_split: str = "test"
    max_prompts: int = 0
    eval_max_prompts: int = 0
    # Tokens: longer prompts are skipped; answers are sampled up to max_response_length.
    max_prompt_length: Optional[int] = None
    max_response_length: Optional[int] = None
    # Answers per prompt; trainer.batch_size must be a multiple (the API packs whole groups).
    group_size: Optional[int] = None
    # verl data_source for every row (picks verl's scorer), "" for each row's own.
    data_source: str = ""
    # verl: verl's default_compute_score by data_source; or package.module:function.
    reward_fn: str = "verl"
    # Row fields holding the question and the answer ("": the usual names).
    prompt_field: str = ""
    answer_field: str = ""

    def validate(self) -> None:
        _require(self.source == "atropos", "data.source", f"unsupported source {self.source!r}; available: atropos")
        for index, env in enumerate(self.envs):
            env.validate(f"data.envs[{index}]")
        names = [env.name for env in self.envs]
        _require(len(set(names)) == len(names), "data.envs", f"environment names must be unique, got {names}")
        _require(self.max_restarts >= 0, "data.max_restarts", "must be >= 0")
        _require(self.restart_backoff > 0, "data.restart_backoff", "must be > 0")
        _require(bool(self.split), "data.split", "must not be empty")
        _require(bool(self.eval_split), "data.eval_split", "must not be empty")
        _require(self.max_prompts >= 0, "data.max_prompts", f"must be >= 0 (0: all), got {self.max_prompts}")
        _require(
            self.eval_max_prompts >= 0, "data.eval_max_prompts", f"must be >= 0 (0: all), got {self.eval_max_prompts}"
        )
        _require(
            self.max_prompt_length is None or self.max_prompt_length >= 0,
            "data.max_prompt_length",
            f"must be >= 0 (0: no limit), got {self.max_prompt_length}",
        )
        _require(
            self.max_response_length is None or self.max_response_length >= 1,
            "data.max_response_length",
            f"must be >= 1, got {self.max_response_length}",
        )
        _require(
            self.group_size is None or self.group_size >= 1, "data.group_size", f"must be >= 1, got {self.group_size}"
        )
        _require(
            self.reward_fn == "verl" or ":" in self.reward_fn,
            "data.reward_fn",
            f"must be verl or package.module:function, got {self.reward_fn!r}",
        )
        for index, env in enumerate(self.envs):
            if env.module == DATASET_ENV_MODULE and "--env.source" in env.args[:-1]:
                # Caught here, not when the environment starts after the engines (minutes later).
                _require(
                    bool(env.args[env.args.index("--env.source") + 1]),
                    "data.path",
                    f"environment {env.name!r} (data.envs[{index}]) needs a dataset: set data.path to a hub "
                    "dataset name or a .jsonl/.json/.parquet file or folder",
                )


@dataclass
class TrainerConfig:
    total_training_steps: int = 10
    # Sequences per training step, registered with the Atropos API as batch_size.
    batch_size: int = 8
    # Longest sequence (prompt + completion) accepted; longer groups are rejected.
    max_token_len: int = 2048
    device: str = "auto"
    n_gpus_per_node: int = 1
    nnodes: int = 1
    # Join an existing Ray cluster (multi-node); null starts a local one.
    ray_address: Optional[str] = None
    ray_num_cpus: Optional[int] = None
    run_dir: str = "."
    project_name: str = "atropos-verl"
    experiment_name: str = "run"
    # verl Tracking backends besides metrics.jsonl: console, tensorboard, wandb, ...
    logger: list[str] = field(default_factory=lambda: ["console"])
    save_freq: int = 0
    max_ckpt_to_keep: Optional[int] = None
    # auto: continue from the latest checkpoint in run_dir if there is one; disable: start fresh.
    resume: str = "auto"
    # A live progress bar per step (off in logs and tests).
    progress_bar: bool = True
    seed: int = 1

    def validate(self) -> None:
        _require(self.total_training_steps >= 1, "trainer.total_training_steps", "must be >= 1")
        _require(self.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_token_len >= 2, "trainer.max_token_len", f"must be >= 2, got {self.max_token_len}")
        _require(
            self.device in ("auto", "cpu", "cuda"), "trainer.device", f"must be auto, cpu or cuda, got {self.device!r}"
        )
        _require(self.n_gpus_per_node >= 1, "trainer.n_gpus_per_node", "must be >= 1")
        _require(self.nnodes >= 1, "trainer.nnodes", "must be >= 1")
        _require(self.save_freq >= 0, "trainer.save_freq", "must be >= 0 (0 saves only at the end)")
        _require(self.resume in ("auto", "disable"), "trainer.resume", f"must be auto or disable, got {self.resume!r}")

    @property
    def world_size(self) -> int:
        return self.n_gpus_per_node * self.nnodes


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    atropos: AtroposConfig = field(default_factory=AtroposConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        for section in (
            self.model,
            self.atropos,
            self.advantage,
            self.loss,
            self.actor,
            self.engine,
            self.data,
            self.trainer,
        ):
            section.validate()
        dp = self.trainer.world_size // self.actor.ulysses_sequence_parallel_size
        _require(
            self.trainer.world_size % self.actor.ulysses_sequence_parallel_size == 0,
            "actor.ulysses_sequence_parallel_size",
            f"must divide the world size {self.trainer.world_size} (n_gpus_per_node x nnodes)",
        )
        _require(
            self.actor.ulysses_sequence_parallel_size == 1 or self.model.use_remove_padding is not False,
            "model.use_remove_padding",
            "must be true (or null) when actor.ulysses_sequence_parallel_size > 1",
        )
        # verl's Ulysses patch replaces the flash-attention kernel only: with SDPA or eager
        # attention each rank would attend within its own shard and train on wrong numbers.
        _require(
            self.actor.ulysses_sequence_parallel_size == 1
            or self.model.attn_implementation.startswith("flash_attention"),
            "actor.ulysses_sequence_parallel_size",
            f"> 1 needs model.attn_implementation=flash_attention_2 (got {self.model.attn_implementation!r})",
        )
        _require(
            self.engine.kind == "external" or self.engine.max_model_len >= self.trainer.max_token_len,
            "engine.max_model_len",
            f"must be >= trainer.max_token_len ({self.trainer.max_token_len}) so environments can produce "
            "sequences the trainer accepts",
        )
        _require(
            self.trainer.batch_size >= dp * self.actor.num_mini_batches,
            "trainer.batch_size",
            f"must be >= data-parallel size x actor.num_mini_batches = {dp * self.actor.num_mini_batches}",
        )
        data = self.data
        if data.max_prompt_length and data.max_response_length:
            # atroposlib drops a group holding a sequence of max_token_len tokens or more.
            _require(
                data.max_prompt_length + data.max_response_length < self.trainer.max_token_len,
                "data.max_response_length",
                f"data.max_prompt_length + data.max_response_length ({data.max_prompt_length} + "
                f"{data.max_response_length}) must be < trainer.max_token_len ({self.trainer.max_token_len})",
            )
        _require(
            data.group_size is None or self.trainer.batch_size % data.group_size == 0,
            "data.group_size",
            f"trainer.batch_size ({self.trainer.batch_size}) must be a multiple of data.group_size ({data.group_size})",
        )


def load_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Typed, validated view of a composed Hydra config; errors name the bad key."""
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        run_config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).strip()) from exc
    run_config.validate()
    return run_config


def check_device(cfg: RunConfig, device: str) -> None:
    """Checks that need the device ``trainer.device`` resolved to (``auto`` is only known at start-up)."""
    # CPU bf16 matmuls are slow, and their log-probs drift from an fp32 engine's by about
    # the sync check's whole threshold (0.043-0.049 against engine.sync_check_threshold 0.05).
    _require(
        not (device == "cpu" and cfg.actor.dtype == "bfloat16"),
        "actor.dtype",
        f"bfloat16 is not supported on the CPU (trainer.device={cfg.trainer.device} runs on cpu here); "
        "set actor.dtype=float32",
    )
