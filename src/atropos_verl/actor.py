"""The policy's training side: verl 0.9.1 FSDP2 ``TrainingWorker``s on a Ray worker group.

The driver holds an :class:`Actor`; each rank runs a :class:`PolicyWorker`
(verl's ``TrainingWorker``, which owns the FSDP2 engine, optimizer and
checkpoint manager). One Atropos batch becomes one call of verl's
``train_mini_batch`` (``actor.num_mini_batches`` optimizer steps), with our
advantage-weighted token loss installed through ``set_loss_fn``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from functools import partial
from itertools import chain
from typing import Any

import ray
import torch
from tensordict import NonTensorData, TensorDict

# Registers verl's "cpu" platform in this process whether or not the package's
# verl.plugins entry point is installed (e.g. a source checkout on PYTHONPATH).
import atropos_verl.platform_cpu  # noqa: F401
from atropos_verl.config import RunConfig
from atropos_verl.loss import verl_policy_loss
from atropos_verl.rows import BatchArrays, cuts_by_offsets, split_rows
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.trainer.config import CheckpointConfig
from verl.utils import tensordict_utils as tu
from verl.utils.metric.utils import Metric
from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, TrainingWorkerConfig
from verl.workers.engine_workers import TrainingWorker

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but torch sees no CUDA device; use trainer.device=cpu or auto")
    return requested


def _dispatch_rows_by_data_parallel_rank(worker_group, batch: TensorDict):
    """Each worker's share of ``batch``: its data-parallel rank's consecutive rows, as :class:`BatchArrays`.

    The same shares as verl's dispatch for ``train_mini_batch``, whose generic
    chunking re-nests every row and puts each share through a thread pool even
    when there is one rank, and which sends TensorDicts through torch's
    serialiser. On a 2-core CPU, 32 x 1,024 tokens took 15-28 ms from the
    driver's call to the worker's first line that way, ~5 ms this way.
    """
    if "train" not in worker_group._dispatch_info:
        worker_group._dispatch_info["train"] = worker_group._query_dispatch_info("train")
    rank_of_worker = worker_group._dispatch_info["train"]
    ranks = max(rank_of_worker) + 1
    if ranks == 1:
        shares = [batch]
    elif cuts_by_offsets(batch):
        shares = split_rows(batch, ranks, copy=True)
    else:
        shares = tu.chunk_tensordict(batch, ranks)
    shares = [BatchArrays.from_tensordict(share) or share for share in shares]
    if worker_group.world_size > 1:
        # Serialise each share once, however many workers (e.g. Ulysses ranks) receive it.
        shares = [ray.put(share) for share in shares]
    return ([shares[rank] for rank in rank_of_worker],), {}


ROWS_BY_DATA_PARALLEL_RANK = {
    "dispatch_fn": _dispatch_rows_by_data_parallel_rank,
    "collect_fn": make_nd_compute_dataproto_dispatch_fn(mesh_name="train")["collect_fn"],
}


class PolicyWorker(TrainingWorker):
    """verl's TrainingWorker on our engine (atropos_verl.engine), prepared to also run on the CPU platform.

    verl builds the process group as ``cpu:gloo,<device>:<backend>``, which torch
    rejects when the device is the CPU itself: creating the gloo group first (verl
    skips its own when one exists) fixes that without touching verl. verl registers
    its FSDP engine for accelerators only; ours is registered for whatever device
    this worker runs on.
    """

    def __init__(self, config: TrainingWorkerConfig, device: str):
        if device == "cpu":
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(
                    backend="gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
                )
        from atropos_verl.engine import use_policy_engine
        from atropos_verl.logprobs import install

        use_policy_engine()
        install()
        super().__init__(config)

    @register(dispatch_mode=ROWS_BY_DATA_PARALLEL_RANK, blocking=False)
    def train_mini_batch(self, data: TensorDict | BatchArrays) -> TensorDict | None:
        """``num_mini_batch`` optimizer steps over consecutive row ranges of ``data``, as verl's ``train_mini_batch``.

        verl's version selects each mini-batch row by row (re-nesting every jagged
        row) and gathers token counts as Python objects even on one rank, all
        before the GPU gets its first kernel. One pass (``epochs=1``) in order is
        what the Actor asks for; anything else goes to verl's version.
        """
        if isinstance(data, BatchArrays):
            data = data.to_tensordict()
        num_mini_batches = tu.get_non_tensor_data(data, "num_mini_batch", None)
        if (
            num_mini_batches is None
            or tu.get_non_tensor_data(data, "mini_batch_size", None) is not None
            or tu.get_non_tensor_data(data, "epochs", 1) != 1
            or tu.get_non_tensor_data(data, "dataloader_kwargs", None)
            or not cuts_by_offsets(data)
        ):
            return super().train_mini_batch(data)
        disable_auto_offload = tu.pop(data, key="disable_auto_offload", default=False)
        for key in ("num_mini_batch", "epochs", "seed", "dataloader_kwargs"):
            tu.pop(data, key=key, default=None)
        mini_batches = split_rows(data, num_mini_batches)
        outputs = []
        with self.engine.train_mode(disable_auto_offload=disable_auto_offload):
            for index, mini_batch in enumerate(mini_batches):
                tu.assign_non_tensor(
                    mini_batch,
                    global_token_num=NonTensorData(self._global_token_num(mini_batch)),
                    update_lr_scheduler=index == len(mini_batches) - 1,
                    disable_auto_offload=True,
                )
                with torch.profiler.record_function(f"mini_batch{index}"):
                    outputs.append(self.train_batch(mini_batch))
                self.profiler.step()
        if not self.engine.is_mp_src_rank_with_outputs():
            return None
        metrics: dict[str, list] = {}
        for output in outputs:
            for key, value in tu.get(output, "metrics").items():
                if isinstance(value, list):
                    # One entry per data-parallel rank: verl's reduction over ranks.
                    value = Metric.aggregate_dp(value) if isinstance(value[0], Metric) else list(chain.from_iterable(value))
                metrics.setdefault(key, []).append(value)
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics}).cpu()

    def _global_token_num(self, mini_batch: TensorDict) -> list[int]:
        """Sequence lengths of this mini-batch on every data-parallel rank (verl's MFU estimate reads them)."""
        lengths = mini_batch["input_ids"].offsets().diff().tolist()
        group = self.engine.get_data_parallel_group()
        ranks = torch.distributed.get_world_size(group)
        if ranks == 1:
            return lengths
        gathered = [None] * ranks
        torch.distributed.all_gather_object(gathered, lengths, group)
        return [length for rank_lengths in gathered for length in rank_lengths]

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_weights(self, out_dir: str, bucket_bytes: int, dtype: str) -> dict[str, float]:
        """Write the full policy as safetensors buckets (HF names) into ``out_dir``; rank 0 writes.

        Every rank walks verl's per-tensor generator because each full tensor is an
        all-gather of FSDP shards; only one tensor plus one bucket is held at a time,
        never a second full copy of the model.
        """
        from safetensors.torch import save_file

        start = time.perf_counter()
        writer = self.rank == 0
        target = torch.float32 if dtype == "float32" else torch.bfloat16
        if writer:
            os.makedirs(out_dir, exist_ok=True)
        # A tied output projection is the input embedding: engines and HF loaders re-tie it,
        # and writing both names would store the same tensor twice.
        hf_config = self.model_config.hf_config
        tied = getattr(getattr(hf_config, "get_text_config", lambda: hf_config)(), "tie_word_embeddings", False)
        per_tensor, _ = self.engine.get_per_tensor_param()
        bucket: dict[str, torch.Tensor] = {}
        bucket_size = total_bytes = files = tensors = 0
        for name, tensor in per_tensor:
            if not writer or (tied and name == "lm_head.weight"):
                continue
            value = tensor.detach().to("cpu", dtype=target if tensor.is_floating_point() else tensor.dtype).contiguous()
            bucket[name] = value
            size = value.numel() * value.element_size()
            bucket_size += size
            total_bytes += size
            tensors += 1
            if bucket_size >= bucket_bytes:
                save_file(bucket, os.path.join(out_dir, f"model-{files:05d}.safetensors"))
                files += 1
                bucket, bucket_size = {}, 0
        if writer and bucket:
            save_file(bucket, os.path.join(out_dir, f"model-{files:05d}.safetensors"))
            files += 1
        return {"bytes": float(total_bytes), "tensors": float(tensors), "files": float(files), "seconds": time.perf_counter() - start}


# verl's wrap policy for one FSDP2 unit holding the whole model. verl builds its FSDP1 policy
# from this too, for either strategy, and "disable" skips that; its FSDP2 path (apply_fsdp2)
# wraps the modules whose class is listed before the root and refuses an empty list, so the
# list names a class no module has.
WHOLE_MODEL = {"disable": True, "transformer_layer_cls_to_wrap": ["<whole model>"]}


def uses_fused_optimizer(cfg: RunConfig, device: str) -> bool:
    if cfg.actor.fused_optimizer is not None:
        return cfg.actor.fused_optimizer
    return device == "cuda" and not cfg.actor.param_offload


def training_worker_config(cfg: RunConfig, model_path: str, device: str) -> TrainingWorkerConfig:
    """Translate our typed config into verl's engine, optimizer and model configs."""
    actor = cfg.actor
    precision = "bf16" if actor.dtype == "bfloat16" else "fp32"
    wrap_layers = cfg.trainer.world_size > 1 if actor.wrap_layers is None else actor.wrap_layers
    model = HFModelConfig(
        path=model_path,
        tokenizer_path=cfg.model.tokenizer_path,
        trust_remote_code=cfg.model.trust_remote_code,
        override_config={"attn_implementation": cfg.model.attn_implementation},
        enable_gradient_checkpointing=cfg.model.enable_gradient_checkpointing,
        use_remove_padding=cfg.model.remove_padding or actor.ulysses_sequence_parallel_size > 1,
        use_fused_kernels=actor.use_fused_kernels,
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
        checkpoint_config=CheckpointConfig(),
    )


def ensure_ray(cfg: RunConfig, device: str) -> bool:
    """Join ``trainer.ray_address`` or start a private local Ray instance; True if this call started Ray.

    Ray 2.60 advertises the host's own address and binds its gRPC ports on all
    interfaces whatever ``_node_ip_address`` says; those ports require Ray's
    cluster token (on by default), and our own listeners stay on loopback.
    """
    if ray.is_initialized():
        return False
    env_vars = {}
    if device == "cpu":
        # Workers unpickle PolicyWorker (importing this module) before verl picks a
        # platform; naming the plugin as well keeps that independent of import order.
        env_vars = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "atropos_verl.platform_cpu"}
    if cfg.trainer.ray_address:
        ray.init(address=cfg.trainer.ray_address, runtime_env={"env_vars": env_vars})
    else:
        num_cpus = cfg.trainer.ray_num_cpus or max(os.cpu_count() or 1, cfg.trainer.world_size)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars})
    return True


def _mean(value: Any) -> float:
    values = _as_list(value)
    return float(sum(float(v) for v in values) / max(len(values), 1))


def _total(value: Any) -> float:
    return float(sum(float(v) for v in _as_list(value)))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Actor:
    """Driver-side handle on the policy's FSDP2 workers."""

    def __init__(self, cfg: RunConfig, model_path: str, worker_cls: type[PolicyWorker] = PolicyWorker):
        self.cfg = cfg
        self.device = resolve_device(cfg.trainer.device)
        if self.device == "cpu":
            os.environ["VERL_PLATFORM"] = "cpu"
        self._owns_ray = ensure_ray(cfg, self.device)
        worker_config = training_worker_config(cfg, model_path, self.device)
        self._pool = pool = RayResourcePool(
            process_on_nodes=[cfg.trainer.n_gpus_per_node] * cfg.trainer.nnodes,
            use_gpu=self.device == "cuda",
            # Each CPU worker takes one Ray CPU; verl's default of 10 asks for 10 per worker and never schedules.
            max_colocate_count=1 if self.device == "cpu" else 10,
        )
        self.workers = RayWorkerGroup(
            resource_pool=pool,
            ray_cls_with_init=RayClassWithInitArgs(ray.remote(worker_cls), config=worker_config, device=self.device),
            device_name=self.device,
        )
        self.workers.set_loss_fn(
            partial(verl_policy_loss, reduction=cfg.loss.reduction, clip_ratio=cfg.loss.clip_ratio)
        )
        self.workers.reset()
        self.data_parallel_size = cfg.trainer.world_size // cfg.actor.ulysses_sequence_parallel_size
        logger.info(
            "policy workers ready: %d x %s, data-parallel %d, ulysses %d (%s)",
            cfg.trainer.world_size,
            self.device,
            self.data_parallel_size,
            cfg.actor.ulysses_sequence_parallel_size,
            socket.gethostname(),
        )

    @property
    def batch_multiple(self) -> int:
        """Sequence counts must be a multiple of this for verl to split a batch evenly."""
        return self.data_parallel_size * self.cfg.actor.num_mini_batches

    def train(self, batch: TensorDict) -> dict[str, float]:
        """One Atropos batch → ``num_mini_batches`` optimizer steps; returns scalar metrics."""
        tu.assign_non_tensor(
            batch,
            num_mini_batch=self.cfg.actor.num_mini_batches,
            epochs=1,
            seed=self.cfg.actor.seed,
        )
        output = self.workers.train_mini_batch(batch).get()
        raw = tu.get(output, "metrics")
        metrics = {
            "train/loss": _mean(raw["loss"]),
            "train/grad_norm": _mean(raw["grad_norm"]),
            "train/logprob": _mean(raw["actor/logprob"]),
        }
        if "lr" in raw:
            metrics["train/lr"] = _mean(raw["lr"])
        sampled = _total(raw["actor/inference_logprob_weight_share"])
        if sampled > 0:
            metrics["train/inference_logprob_abs_diff"] = _total(raw["actor/inference_logprob_abs_diff_share"]) / sampled
        if "actor/clip_fraction" in raw:
            metrics["train/clip_fraction"] = _mean(raw["actor/clip_fraction"])
        if "mfu" in raw:
            metrics["perf/mfu"] = _mean(raw["mfu"])
        if "perf/max_memory_allocated_gb" in raw:
            metrics["perf/max_memory_allocated_gb"] = max(float(v) for v in _as_list(raw["perf/max_memory_allocated_gb"]))
        return metrics

    def export_weights(self, out_dir: str, bucket_bytes: int, dtype: str) -> dict[str, float]:
        """Full policy weights as safetensors buckets in ``out_dir`` (see PolicyWorker.export_weights)."""
        return self.workers.export_weights(out_dir, bucket_bytes, dtype)[0]

    def log_probs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of each sequence under the current weights: entry t is log p(token t+1)."""
        batch = _jagged_batch(sequences, self.batch_multiple)
        output = self.workers.infer_batch(batch).get()
        values = output["log_probs"]
        return [row.tolist()[: len(seq)] for row, seq in zip(values.unbind(), sequences)]

    def save_checkpoint(self, path: str, step: int) -> None:
        self.workers.save_checkpoint(path, global_step=step, max_ckpt_to_keep=None)

    def load_checkpoint(self, path: str) -> None:
        self.workers.load_checkpoint(path, del_local_after_load=False)

    def shutdown(self) -> None:
        """Stop the workers and free their placement groups (and Ray itself if this Actor started it)."""
        for worker in self.workers.workers:
            ray.kill(worker)
        for placement_group in self._pool.pgs or []:
            ray.util.remove_placement_group(placement_group)
        if self._owns_ray:
            ray.shutdown()



def _jagged_batch(sequences: list[list[int]], multiple: int) -> TensorDict:
    padded = list(sequences) + [sequences[0]] * (-len(sequences) % multiple)
    ids = [torch.tensor(seq, dtype=torch.long) for seq in padded]
    return tu.get_tensordict(
        tensor_dict={
            "input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged),
            "position_ids": torch.nested.as_nested_tensor([torch.arange(len(t)) for t in ids], layout=torch.jagged),
            "loss_mask": torch.nested.as_nested_tensor([torch.ones(len(t)) for t in ids], layout=torch.jagged),
        },
        non_tensor_dict={"temperature": 1.0, "compute_loss": False, "global_token_num": [len(t) for t in ids]},
    )
