"""Typed configuration of a training run: the one place its defaults are written.

The dataclasses below are registered with Hydra's ConfigStore as ``run_config``, the
first entry of ``atropos_verl/conf/config.yaml``'s defaults list; the YAML groups under it
override only what differs. :func:`load_config` turns a composed config into these
dataclasses (an unknown key or a wrong type fails with OmegaConf's message naming the
full key), and :meth:`RunConfig.validate` checks what types alone cannot: the rules
attached to each field (:func:`rule`: ranges, choices, non-empty) and the rules that
tie fields together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def rule(
    *,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    choices: Optional[tuple] = None,
    nonempty: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """A field's own rule, checked by :func:`check_fields` (null values pass: null means "not set")."""
    return {"ge": ge, "gt": gt, "le": le, "choices": choices, "nonempty": nonempty, "note": note}


def check_fields(section: Any, prefix: str) -> None:
    """Apply every field's :func:`rule`; the error names ``prefix.field`` and the allowed values."""
    for f in dataclasses.fields(section):
        checks = f.metadata
        value = getattr(section, f.name)
        if not checks or value is None:
            continue
        key, got, note = f"{prefix}.{f.name}", f"got {value!r}", f" ({checks['note']})" if checks["note"] else ""
        if checks["choices"] is not None:
            _require(value in checks["choices"], key, f"must be one of {', '.join(map(str, checks['choices']))}, {got}")
        if checks["nonempty"]:
            _require(bool(value), key, f"must not be empty{note}")
        if checks["ge"] is not None:
            _require(value >= checks["ge"], key, f"must be >= {checks['ge']}{note}, {got}")
        if checks["gt"] is not None:
            _require(value > checks["gt"], key, f"must be > {checks['gt']}{note}, {got}")
        if checks["le"] is not None:
            _require(value <= checks["le"], key, f"must be <= {checks['le']}{note}, {got}")


def _f(default: Any, **checks: Any) -> Any:
    """A field with a default (a list default is copied per instance) and its rule."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rule(**checks))
    return field(default=default, metadata=rule(**checks))


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")

# vLLM's --max-lora-rank takes only these; a replica starts with the smallest one >= model.lora.rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT LoRA) trained through verl's FSDP2 engine; ``rank: 0`` trains the full model.

    verl's names: ``rank`` → ``lora_rank``, ``alpha`` → ``lora_alpha``, ``target_modules`` as is.
    Only the adapter is synced to vLLM and SGLang replicas (atropos_verl.serving.lora) and checkpointed;
    ``python -m atropos_verl.lora_export`` turns a checkpoint's adapter into a model or a PEFT folder.
    """

    rank: int = _f(0, ge=0, le=VLLM_LORA_RANKS[-1], note="0 turns LoRA off")
    alpha: int = _f(16, gt=0)
    # Module names PEFT wraps (e.g. [q_proj, v_proj]), or [all-linear]: every linear layer but the output head.
    target_modules: list[str] = _f(["all-linear"], nonempty=True)
    dropout: float = _f(0.0, ge=0, note="and < 1")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def peft_target_modules(self) -> str | list[str]:
        return "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)

    def validate(self) -> None:
        check_fields(self, "model.lora")
        _require(self.dropout < 1, "model.lora.dropout", f"must be < 1, got {self.dropout!r}")
        _require(
            "all-linear" not in self.target_modules or len(self.target_modules) == 1,
            "model.lora.target_modules",
            f"all-linear stands alone: use [all-linear] or a list of module names, got {self.target_modules!r}",
        )


@dataclass
class ModelConfig:
    # A Hugging Face hub id, a local folder, or ``builtin:<name>`` for the models
    # this project builds from registry packages (see atropos_verl.assets).
    path: str = _f("builtin:tiny-llama", nonempty=True, note="a hub id, a local folder or builtin:<name>")
    tokenizer_path: Optional[str] = None
    trust_remote_code: bool = False
    # flash_attention_2 needs flash-attn; sdpa runs everywhere.
    attn_implementation: str = _f("sdpa", choices=ATTENTION)
    enable_gradient_checkpointing: bool = False
    # Pack each micro-batch into one row (verl's remove padding). null = auto: on with flash
    # attention (its varlen kernel is the fast path; Ulysses needs it), off with SDPA/eager,
    # where packing turns causal attention into a block mask over the whole micro-batch
    # (measured on an H100 in bench/RESULTS.md).
    use_remove_padding: Optional[bool] = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def remove_padding(self) -> bool:
        if self.use_remove_padding is None:
            return self.attn_implementation.startswith("flash_attention")
        return self.use_remove_padding

    def validate(self) -> None:
        check_fields(self, "model")
        self.lora.validate()


@dataclass
class AtroposConfig:
    api_url: str = "http://127.0.0.1:8000"
    # Seconds start-up waits for the API before failing (the seed's atropos.timeout).
    timeout: float = _f(60.0, gt=0)
    request_timeout: float = _f(30.0, gt=0)
    poll_interval: float = _f(0.2, gt=0)
    max_poll_interval: float = _f(5.0, gt=0)
    # Give up when no batch arrives for this long (null waits forever).
    batch_timeout: Optional[float] = _f(1800.0, gt=0)
    max_retries: int = _f(5, ge=0)
    # A second trainer registering does not reset the API; allow wiping its state.
    reset_on_mismatch: bool = False
    # auto: start run-api at api_url when nothing answers there (loopback URLs only);
    # always: start it (the port must be free); never: it must already run.
    start_api: str = _f("auto", choices=("auto", "always", "never"))
    # Seconds without a batch after which the periodic "why no batch" line also suggests a fix.
    starvation_hint_after: float = _f(300.0, ge=0)
    wandb_group: str = "atropos-verl"
    wandb_project: str = "atropos-verl"

    def validate(self) -> None:
        check_fields(self, "atropos")
        _require(
            self.api_url.startswith(("http://", "https://")), "atropos.api_url", f"not an http(s) URL: {self.api_url!r}"
        )
        _require(
            self.max_poll_interval >= self.poll_interval,
            "atropos.max_poll_interval",
            f"must be >= atropos.poll_interval ({self.poll_interval}), got {self.max_poll_interval}",
        )


NORMALIZATIONS = ("group", "batch", "none")


@dataclass
class AdvantageConfig:
    # Where score-derived advantages are centred (and scaled): within each group
    # (GRPO), across the whole batch, or not at all (raw scores).
    normalization: str = _f("group", choices=NORMALIZATIONS)
    # Divide by the standard deviation after centring (false: Dr. GRPO style).
    scale_by_std: bool = True
    eps: float = _f(1e-6, gt=0)
    # [low, high] applied to every final advantage, or null for no clipping.
    clip: Optional[list[float]] = _f([-3.0, 3.0])
    # Token-level advantages sent by an environment replace score-derived ones.
    use_env_advantages: bool = True

    def validate(self) -> None:
        check_fields(self, "advantage")
        if self.clip is not None:
            _require(len(self.clip) == 2, "advantage.clip", f"must be [low, high] or null, got {self.clip}")
            _require(self.clip[0] < self.clip[1], "advantage.clip", f"low must be < high, got {self.clip}")


REDUCTIONS = ("token-mean", "sequence-mean", "sum")
# verl's names for the KL estimators (atropos_verl.regularizers.kl_estimate); "+": k2's gradient.
KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
KL_LOSS_TYPES = KL_ESTIMATORS + tuple(f"{name}+" for name in KL_ESTIMATORS)
DISTILL_DIRECTIONS = ("forward", "reverse")


@dataclass
class LossConfig:
    # token-mean: sum(-A*m*logp)/sum(m) over the mini-batch (all DP ranks);
    # sequence-mean: mean over sequences of each sequence's token mean; sum: no normalisation.
    reduction: str = _f("token-mean", choices=REDUCTIONS)
    # PPO-style ratio clip against the env's inference_logprobs (null: plain
    # advantage-weighted cross-entropy, which is what on-policy data needs).
    clip_ratio: Optional[float] = None
    # Scale logits by each sequence's sampling temperature before log-softmax,
    # so trainer log-probs are comparable with the sampler's.
    use_sampling_temperature: bool = True
    # Weight of the policy-gradient term (0: train on the terms below alone, e.g. pure distillation).
    policy_coef: float = _f(1.0, ge=0)
    # KL to a reference policy from the env's ref_logprobs (verl's names; estimators in
    # atropos_verl.regularizers). actor/kl_loss is logged whenever ref_logprobs arrive.
    use_kl_loss: bool = False
    kl_loss_coef: float = _f(0.001, ge=0)
    kl_loss_type: str = _f("low_var_kl", choices=KL_LOSS_TYPES)
    # Reference for sequences sent without ref_logprobs: "" none (no KL term there), "policy" a
    # frozen copy of the starting weights (model.path) in the policy engine, or a model path / builtin:<name>.
    ref_model: str = ""
    # On-policy distillation from the env's distill_token_ids/distill_logprobs (teacher top-k):
    # KL on the renormalised top-k support, forward KL(teacher||student) or reverse.
    distill_coef: float = _f(0.0, ge=0)
    distill_direction: str = _f("forward", choices=DISTILL_DIRECTIONS)
    # Entropy bonus (verl's entropy_coeff); calculate_entropy logs actor/entropy without one.
    entropy_coeff: float = _f(0.0, ge=0)
    calculate_entropy: bool = False

    @property
    def needs_padded_rows_step(self) -> bool:
        """True when a term reads the logits or a hosted reference: only the padded-rows step provides them."""
        return self.distill_coef > 0 or self.entropy_coeff > 0 or self.calculate_entropy or bool(self.ref_model)

    def validate(self) -> None:
        check_fields(self, "loss")
        _require(
            self.policy_coef > 0 or (self.use_kl_loss and self.kl_loss_coef > 0) or self.distill_coef > 0,
            "loss.policy_coef",
            "is 0 and no other term (loss.use_kl_loss, loss.distill_coef) trains: set one of them",
        )
        _require(
            self.clip_ratio is None or 0 < self.clip_ratio < 1,
            "loss.clip_ratio",
            f"must be in (0, 1) or null, got {self.clip_ratio}",
        )


IS_LEVELS = ("token", "sequence")
# A ratio bound (k1) means nothing for a sequence's largest token, so there is no seq_max_k1 (as in verl).
RS_OPTIONS = (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)


def _positive_number(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a number") from None
    _require(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {text!r}")
    return value


def _bounds(spec: str, key: str) -> tuple[Optional[float], float]:
    """``"upper"`` or ``"lower_upper"`` (verl's threshold strings) as (lower or None, upper)."""
    if "_" not in spec:
        return None, _positive_number(spec, key)
    lower_text, upper_text = spec.split("_", 1)
    lower, upper = _positive_number(lower_text, key), _positive_number(upper_text, key)
    _require(lower <= upper, key, f"lower bound must be <= upper bound, got {spec!r}")
    return lower, upper


@dataclass
class RolloutCorrectionConfig:
    """Importance-sampling correction between the sampler's log-probs and the trainer's (verl's names).

    The weight is ``r = pi_trainer / pi_sampler`` per token (``rollout_is=token``) or its
    product over the sequence (``sequence``), from the trainer's log-probs before the
    update and the environment's ``inference_logprobs``; it multiplies each token's
    objective. Sequences without ``inference_logprobs`` are left as they are. Metrics
    (``rollout_corr/*``) are logged whether or not the correction is on.
    """

    # null: no weights; token: per-token ratio (biased, low variance); sequence: product (unbiased, high variance).
    rollout_is: Optional[str] = _f(None, choices=IS_LEVELS)
    # "2.0": weights truncated at 2.0 (TIS); "0.5_2.0": weights outside [0.5, 2.0] set to 0 (masked).
    rollout_is_threshold: str = "2.0"
    # Rejection of tokens/sequences whose divergence is too large, comma-separated options
    # <level>_<k>: level token|seq_sum|seq_mean|seq_max, k1 (ratio in [lower, upper]),
    # k2 (0.5 log(r)^2 <= upper) or k3 (r - 1 - log r <= upper). null: none.
    rollout_rs: Optional[str] = None
    # One threshold per rollout_rs option, or one for all; k1 takes "lower_upper" or "upper" (lower 1/upper).
    rollout_rs_threshold: Optional[str] = None

    def is_bounds(self) -> tuple[Optional[float], float]:
        return _bounds(self.rollout_is_threshold.strip(), "rollout_correction.rollout_is_threshold")

    def rejections(self) -> list[tuple[str, Optional[float], float]]:
        """Each rollout_rs option with its (lower, upper) bounds; lower is None except for k1."""
        if self.rollout_rs is None:
            return []
        options = list(dict.fromkeys(o.strip() for o in self.rollout_rs.split(",") if o.strip()))
        key = "rollout_correction.rollout_rs"
        _require(bool(options), key, "must name at least one option or be null")
        for option in options:
            _require(option in RS_OPTIONS, key, f"unknown option {option!r}; one of {', '.join(RS_OPTIONS)}")
        threshold_key = "rollout_correction.rollout_rs_threshold"
        _require(self.rollout_rs_threshold is not None, threshold_key, "must be set when rollout_rs is")
        specs = [t.strip() for t in str(self.rollout_rs_threshold).split(",") if t.strip()]
        _require(
            len(specs) in (1, len(options)), threshold_key, f"needs 1 or {len(options)} thresholds, got {len(specs)}"
        )
        specs = specs * len(options) if len(specs) == 1 else specs
        parsed = []
        for option, spec in zip(options, specs):
            lower, upper = _bounds(spec, threshold_key)
            if option.endswith("k1"):
                parsed.append((option, lower if lower is not None else 1.0 / upper, upper))
            else:
                _require(lower is None, threshold_key, f"{option} takes an upper bound only, got {spec!r}")
                parsed.append((option, None, upper))
        return parsed

    @property
    def enabled(self) -> bool:
        return self.rollout_is is not None or self.rollout_rs is not None

    def validate(self) -> None:
        check_fields(self, "rollout_correction")
        self.is_bounds()
        self.rejections()


@dataclass
class ActorConfig:
    """verl FSDP2 training engine settings (verl's names where they exist)."""

    strategy: str = _f("fsdp2", choices=("fsdp2",))
    lr: float = _f(1e-6, gt=0)
    weight_decay: float = 0.0
    betas: list[float] = _f([0.9, 0.999])
    clip_grad: float = _f(1.0, gt=0)
    lr_warmup_steps: int = 0
    lr_scheduler_type: str = _f("constant", choices=("constant", "cosine"))
    # Compute dtype. bfloat16 keeps fp32 master weights and runs matmuls in bf16; auto is
    # bfloat16 on CUDA and float32 on the CPU (where bf16 is slow and drifts from the engine).
    dtype: str = _f("auto", choices=("auto", "bfloat16", "float32"))
    ulysses_sequence_parallel_size: int = _f(1, ge=1)
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
    max_token_len_per_gpu: int = _f(16384, gt=0)
    micro_batch_size_per_gpu: int = _f(4, gt=0)
    # Optimizer steps per Atropos batch (PPO-style mini-batches over one batch).
    num_mini_batches: int = _f(1, ge=1)
    use_torch_compile: bool = False
    use_fused_kernels: bool = False
    seed: int = 42

    def validate(self) -> None:
        check_fields(self, "actor")
        _require(len(self.betas) == 2, "actor.betas", f"must be [beta1, beta2], got {self.betas}")
        _require(
            not (self.fused_optimizer and self.param_offload),
            "actor.fused_optimizer",
            "cannot be true with actor.param_offload: the fused kernel needs the parameters on the GPU",
        )


ENGINE_KINDS = ("external", "vllm", "sglang")
WEIGHT_TRANSPORTS = ("auto", "folder", "cuda_ipc", "shared_memory", "nccl")


@dataclass
class EngineConfig:
    """Inference replicas that serve the policy to environments, behind one gateway.

    ``external``: environments bring their own inference servers; the trainer
    trains and checkpoints but pushes weights nowhere. ``vllm`` / ``sglang``: the
    trainer starts ``replicas`` servers, a gateway in front of them, and syncs
    weights into every replica after each step.
    """

    kind: str = _f("external", choices=ENGINE_KINDS)
    replicas: int = _f(1, ge=1)
    tensor_parallel_size: int = _f(1, ge=1)
    gpu_memory_utilization: float = _f(0.5, gt=0, le=1)
    max_model_len: int = _f(2048, ge=2)
    # Engine compute dtype; auto is the actor's, so the sync proof compares like with like.
    dtype: str = _f("auto", choices=("auto", "float32", "bfloat16", "float16"))
    # Free accelerator memory while the trainer trains (colocated GPUs).
    sleep_during_training: bool = False
    # colocate: replicas share the trainer's GPUs; split: replicas on engine.gpus (empty: the
    # GPUs after the trainer's), which the trainer's ranks never touch. See placement.py.
    placement: str = _f("colocate", choices=("colocate", "split"))
    gpus: list[int] = _f([])
    startup_timeout: float = _f(900.0, gt=0)
    extra_args: list[str] = _f([])
    gateway_host: str = "127.0.0.1"
    # Fixed port for environments to point at (null: a free port, logged at start).
    gateway_port: Optional[int] = None
    # More ports the gateway also answers on. An environment whose config_init returns a
    # single APIServerConfig ignores its base_url and calls localhost:9004-9007 (an
    # atroposlib quirk): [9004, 9005, 9006, 9007] serves it unmodified.
    gateway_extra_ports: list[int] = _f([])
    # Name of the environment variable holding the gateway's bearer token (the token
    # itself never sits in the config, so it cannot leak into logs or --cfg job).
    api_key_env: Optional[str] = None
    # Seconds a request may wait for a sync to finish before the gateway answers 503.
    max_wait: float = _f(300.0, gt=0)
    drain_timeout: float = _f(60.0, gt=0)
    # Requests in flight when weights change. drain: the gateway waits for them (up to
    # drain_timeout), so every sequence comes from one policy version; with long answers that
    # wait is the longest answer's remaining time at every step (13 s for 512-token GSM8K
    # answers on an H200). keep (vLLM): they stay frozen in the engine across the swap and
    # finish on the new weights; they are labelled with the version they started under (the
    # older, so trainer.max_staleness errs safe), and their inference_logprobs are each
    # token's own sampler's, so the rollout correction stays exact per token.
    in_flight: str = _f("drain", choices=("drain", "keep"))
    # How weights reach replicas: folder (safetensors on tmpfs, any engine/device), cuda_ipc (a replica
    # on the trainer's GPU reads its buffers), shared_memory (a replica on the CPU trainer's host reads
    # its shared memory; for SGLang both are /update_weights_from_tensor), nccl (replicas on other GPUs
    # receive a broadcast from the trainer; explicit only until it has run on GPUs; SGLang's route also
    # takes gloo, so with SGLang it works on a CPU trainer too, verified against SGLang-CPU), auto
    # (cuda_ipc when colocated on CUDA, shared_memory on CPU, else folder).
    weight_transport: str = _f("auto", choices=WEIGHT_TRANSPORTS)
    sync_bucket_mb: int = _f(512, ge=1)
    # Mean |trainer - engine| log-prob on the probe above which the run stops (null: only log).
    sync_check_threshold: Optional[float] = _f(0.05, gt=0)
    sync_probe_sequences: int = _f(2, ge=0)
    # Push weights after every sync_interval-th step only (fewer syncs, staler samples: see trainer.max_staleness).
    sync_interval: int = _f(1, ge=1)
    # Completions the gateway remembers to tell the trainer which policy version sampled each
    # sequence; make it several batches of sequences (older ones are forgotten and count as unknown).
    lineage_capacity: int = _f(65536, ge=1)
    # A replica failing this many health checks in a row, health_interval seconds apart,
    # is restarted and given the current weights before it serves again.
    health_interval: float = _f(10.0, gt=0)
    health_failures: int = _f(3, ge=1)
    # SGLang only. Its interpreter (SGLang needs its own venv: `make sglang-cpu` builds one);
    # null: $ATROPOS_VERL_SGLANG_PYTHON, else the trainer's own.
    python: Optional[str] = None
    # SGLang's --attention-backend; null: triton on CUDA (SGLang's own pick on Hopper, FA3, is left out
    # of pruned builds), torch_native on CPU.
    attention_backend: Optional[str] = None
    # Ray resources each replica's host actor asks for ({node2: 1}: a node started with
    # ray start --resources='{"node2": 1}'), so it runs on such a node of the cluster
    # trainer.ray_address joins; empty: replicas are local processes of the trainer.
    ray_resources: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_fields(self, "engine")
        _check_ray_resources(self.ray_resources, "engine.ray_resources")
        _require(
            self.in_flight == "drain" or self.kind == "vllm",
            "engine.in_flight",
            f"keep needs engine.kind=vllm (SGLang's pause aborts the requests it holds), got {self.kind}",
        )


def _check_ray_resources(resources: dict[str, float], key: str) -> None:
    for name, amount in resources.items():
        _require(amount > 0, f"{key}.{name}", f"must be > 0, got {amount!r}")


ENV_SERVER_TYPES = ("vllm", "sglang", "openai")


@dataclass
class EnvSpec:
    """One Atropos environment the trainer starts and supervises.

    It runs as ``python -m <module> serve ...`` (or ``python <script> serve ...``)
    with the API URL, tokenizer, and (when the trainer runs the engines) the
    gateway URL, model name and server type injected as ``--env.*`` /
    ``--openai.*`` flags; ``args`` are appended last, so they win.
    """

    name: str = _f("env", nonempty=True)
    module: Optional[str] = None
    script: Optional[str] = None
    # The environment's own flags: a list as on its command line ([--env.group_size, "4"]) or
    # a mapping by name, {env: {group_size: 4}, openai: {timeout: 60}} (or {env.group_size: 4}),
    # where null passes nothing. A mapping is edited by name on the command line
    # (data.envs.0.args.env.group_size=8); a list only by position (args.3=...).
    # (null: none; the schema's default cannot be a list, or a mapping would not merge onto it).
    args: Any = None
    replicas: int = _f(1, ge=1)
    # What the environment's inference client speaks (its APIServerConfig.server_type).
    server_type: str = _f("vllm", choices=ENV_SERVER_TYPES)
    # Ray resources its host actor asks for, as engine.ray_resources; empty: a local process.
    ray_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Command-line words: a list's numbers (YAML, or ${data.*} resolved) are their text.
        if isinstance(self.args, list):
            self.args = [str(arg) for arg in self.args]

    def validate(self, key: str) -> None:
        check_fields(self, key)
        _check_ray_resources(self.ray_resources, f"{key}.ray_resources")
        _require(
            (self.module is None) != (self.script is None),
            key,
            f"environment {self.name!r} needs exactly one of module or script",
        )
        _require(
            self.args is None or isinstance(self.args, (list, dict)),
            f"{key}.args",
            f"must be a list of flags or a mapping of flag: value, got {self.args!r}",
        )
        for flag, value in self.flags():
            _require(
                value is None or isinstance(value, (str, int, float, bool)),
                f"{key}.args.{flag}",
                f"must be a single value (a string, number or bool) or null, got {value!r}",
            )

    def flags(self) -> list[tuple[str, Any]]:
        """A mapping ``args`` as (dotted flag name, value), nested mappings joined: {env: {group_size: 4}}."""
        if not isinstance(self.args, dict):
            return []
        found: list[tuple[str, Any]] = []

        def walk(prefix: str, node: dict) -> None:
            for name, value in node.items():
                flag = f"{prefix}{str(name).removeprefix('--')}"
                if isinstance(value, dict):
                    walk(f"{flag}.", value)
                else:
                    found.append((flag, value))

        walk("", self.args)
        return found

    def argv(self) -> list[str]:
        """``args`` as command-line words: a mapping becomes ``--flag value`` pairs in its order."""
        if isinstance(self.args, dict):
            words = []
            for flag, value in self.flags():
                if value is not None:
                    words += [f"--{flag}", ("true" if value else "false") if isinstance(value, bool) else str(value)]
            return words
        return list(self.args or [])


DATASET_ENV_MODULE = "atropos_verl.envs.dataset"


@dataclass
class DataConfig:
    """Where scored groups come from: environments connected to atropos.api_url.

    ``envs`` lists environments the trainer starts itself; others may connect on their own.
    The dataset groups (``data=gsm8k|math|hellaswag|parquet|jsonl``) start the dataset
    environment and hand it the keys below through ``${data.*}`` in ``envs[].args``;
    ``data=atropos`` ignores them. Empty strings and 0 mean "not set".
    """

    envs: list[EnvSpec] = field(default_factory=list)
    # An environment that exits is restarted after restart_backoff x 2^n seconds, at most
    # max_restarts times in a row (a run of healthy uptime resets the count).
    max_restarts: int = _f(5, ge=0)
    restart_backoff: float = _f(2.0, gt=0)
    # Hub dataset name, or a local .jsonl/.json/.parquet file or a folder of them.
    path: str = ""
    split: str = _f("train", nonempty=True)
    # Held-out data scored greedily every few steps ("": no evaluation).
    eval_path: str = ""
    eval_split: str = _f("test", nonempty=True)
    max_prompts: int = _f(0, ge=0, note="0: all")
    eval_max_prompts: int = _f(0, ge=0, note="0: all")
    # Tokens: longer prompts are skipped; answers are sampled up to max_response_length.
    max_prompt_length: Optional[int] = _f(None, ge=0, note="0: no limit")
    max_response_length: Optional[int] = _f(None, ge=1)
    # Answers per prompt; trainer.batch_size must be a multiple (the API packs whole groups).
    group_size: Optional[int] = _f(None, ge=1)
    # Sampling temperature every started environment is given as --env.temperature (null: each
    # environment's own default; the environment's config must have a temperature field).
    temperature: Optional[float] = _f(None, ge=0)
    # verl data_source for every row (picks verl's scorer), "" for each row's own.
    data_source: str = ""
    # verl: verl's default_compute_score by data_source; or package.module:function.
    reward_fn: str = "verl"
    # Row fields holding the question and the answer ("": the usual names).
    prompt_field: str = ""
    answer_field: str = ""

    def validate(self) -> None:
        check_fields(self, "data")
        for index, env in enumerate(self.envs):
            env.validate(f"data.envs[{index}]")
        names = [env.name for env in self.envs]
        _require(len(set(names)) == len(names), "data.envs", f"environment names must be unique, got {names}")
        _require(
            self.reward_fn == "verl" or ":" in self.reward_fn,
            "data.reward_fn",
            f"must be verl or package.module:function, got {self.reward_fn!r}",
        )
        for index, env in enumerate(self.envs):
            argv = env.argv()
            if env.module == DATASET_ENV_MODULE and "--env.source" in argv[:-1]:
                # Caught here, not when the environment starts after the engines (minutes later).
                _require(
                    bool(argv[argv.index("--env.source") + 1]),
                    "data.path",
                    f"environment {env.name!r} (data.envs[{index}]) needs a dataset: set data.path to a hub "
                    "dataset name or a .jsonl/.json/.parquet file or folder",
                )


@dataclass
class TrainerConfig:
    total_training_steps: int = _f(10, ge=1)
    # Sequences per training step, registered with the Atropos API as batch_size.
    batch_size: int = _f(8, ge=1)
    # Longest sequence (prompt + completion) accepted; longer groups are rejected.
    max_token_len: int = _f(2048, ge=2)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    n_gpus_per_node: int = _f(1, ge=1)
    nnodes: int = _f(1, ge=1)
    # Join an existing Ray cluster (multi-node); null starts a local one.
    ray_address: Optional[str] = None
    ray_num_cpus: Optional[int] = None
    run_dir: str = "."
    project_name: str = "atropos-verl"
    experiment_name: str = "run"
    # The run folder's name under runs/<experiment_name>/ (atropos_verl/conf/config.yaml: the start time).
    # A fixed name makes the folder stable: the same command run again resumes (trainer.resume=auto).
    run_name: str = "run"
    # verl Tracking backends besides metrics.jsonl: console, tensorboard, wandb, ...
    logger: list[str] = _f(["console"])
    # Every fetched batch stays in spool.sqlite until a checkpoint covers it: the cadence also bounds the spool.
    save_freq: int = _f(50, ge=0, note="0 saves only at the end")
    # Older checkpoints are deleted once a newer one is complete (null keeps all).
    max_ckpt_to_keep: Optional[int] = _f(3, ge=1)
    # auto: continue from the latest checkpoint in run_dir if there is one; disable: start fresh.
    resume: str = _f("auto", choices=("auto", "disable"))
    # Where a run without checkpoints of its own starts: a global_step_N folder, or a run or
    # checkpoints folder (its latest). Once this run saved a checkpoint, re-running resumes that.
    resume_from: Optional[str] = None
    # A live progress bar per step (off in logs and tests).
    progress_bar: bool = True
    # Groups sampled more than this many policy versions before the one being updated are dropped
    # (stale_groups=drop) or trained with the rollout correction's weights (keep); both are counted.
    # null: no bound. Unknown versions (engine=external) are never bounded.
    max_staleness: Optional[int] = _f(None, ge=0)
    stale_groups: str = _f("drop", choices=("drop", "keep"))

    def validate(self) -> None:
        check_fields(self, "trainer")

    @property
    def world_size(self) -> int:
        return self.n_gpus_per_node * self.nnodes


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    atropos: AtroposConfig = field(default_factory=AtroposConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
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
            self.rollout_correction,
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
        # Distillation and entropy read the logits in this project's padded-rows step only.
        _require(
            not self.model.remove_padding or not self.loss.needs_padded_rows_step,
            "model.use_remove_padding",
            "must be false with loss.distill_coef > 0, loss.entropy_coeff > 0, loss.calculate_entropy or "
            "loss.ref_model "
            f"(null turns it on with model.attn_implementation={self.model.attn_implementation})",
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
        # With dynamic batch size, verl packs micro-batches of at most max_token_len_per_gpu
        # tokens: a valid sequence longer than that would crash inside verl (and be replayed).
        _require(
            not self.actor.use_dynamic_bsz or self.trainer.max_token_len <= self.actor.max_token_len_per_gpu,
            "actor.max_token_len_per_gpu",
            f"must be >= trainer.max_token_len ({self.trainer.max_token_len}) with actor.use_dynamic_bsz, "
            f"got {self.actor.max_token_len_per_gpu}",
        )
        _require(
            self.rollout_correction.rollout_is is None or self.loss.clip_ratio is None,
            "rollout_correction.rollout_is",
            "must be null with loss.clip_ratio: the clipped ratio against inference_logprobs already is the "
            "importance correction (rollout_rs combines with either)",
        )
        _require(
            self.trainer.stale_groups == "drop" or self.rollout_correction.enabled,
            "trainer.stale_groups",
            "keep trains groups over trainer.max_staleness with importance weights: set "
            "rollout_correction.rollout_is (or rollout_rs), or use drop",
        )
        if self.model.lora.enabled:
            _require(
                self.engine.weight_transport in ("auto", "folder"),
                "engine.weight_transport",
                f"with model.lora.rank > 0 only the adapter is synced, as a folder: use auto or folder "
                f"(got {self.engine.weight_transport})",
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
        placed = ["engine.ray_resources"] if self.engine.ray_resources else []
        placed += [f"data.envs[{i}].ray_resources" for i, env in enumerate(data.envs) if env.ray_resources]
        _require(
            not placed or bool(self.trainer.ray_address),
            placed[0] if placed else "",
            "places processes on the nodes of a Ray cluster: set trainer.ray_address to the cluster's address "
            "(ray start --head prints it)",
        )


def load_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Typed, validated view of a composed Hydra config; errors name the bad key."""
    # Plain values merged onto a fresh schema: keys a ``+key=`` override slipped past
    # Hydra's struct check are refused here like any unknown key.
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        run_config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).strip()) from exc
    run_config.validate()
    return run_config


def compute_dtype(actor: ActorConfig, device: str) -> str:
    """The actor's compute dtype on ``device``: ``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    if actor.dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return actor.dtype


def check_device(cfg: RunConfig, device: str) -> None:
    """Checks that need the device ``trainer.device`` resolved to (``auto`` is only known at start-up)."""
    # CPU bf16 matmuls are slow, and their log-probs drift from an fp32 engine's by about
    # the sync check's whole threshold (0.043-0.049 against engine.sync_check_threshold 0.05).
    _require(
        not (device == "cpu" and cfg.actor.dtype == "bfloat16"),
        "actor.dtype",
        f"bfloat16 is not supported on the CPU (trainer.device={cfg.trainer.device} runs on cpu here); "
        "set actor.dtype=float32 or auto",
    )


# Hydra's schema for atropos_verl/conf/config.yaml (its first default): importing this module registers it.
ConfigStore.instance().store(name="run_config", node=RunConfig)
