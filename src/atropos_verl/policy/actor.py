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
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import ray
import torch
from tensordict import TensorDict
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils import tensordict_utils as tu

from atropos_verl.assets import resolve_model_path
from atropos_verl.batch import pack_sequences
from atropos_verl.config import RolloutCorrectionConfig, RunConfig
from atropos_verl.loss import Rejection, RolloutCorrection, verl_policy_loss
from atropos_verl.placement import Placement
from atropos_verl.policy.lora import CHECKPOINT_ADAPTER
from atropos_verl.policy.verl_config import training_worker_config
from atropos_verl.policy.worker import PolicyWorker
from atropos_verl.regularizers import COMPUTE_ENTROPY, RATIO_METRICS, Regularizers

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but torch sees no CUDA device; use trainer.device=cpu or auto")
    return requested


_RAY_TOKEN_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


def _reload_ray_config() -> None:
    """Ray reads its authentication mode once and caches the token; reload both, as ``ray`` does."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _require_ray_token() -> Path:
    """Turn on Ray's token authentication for the local instance this process is about to start.

    Ray 2.60 binds its gRPC ports (GCS, raylets, workers) on every interface whatever
    ``_node_ip_address`` says, so the token is what keeps other hosts (and users) out.
    The token sits in a 0600 file named by ``RAY_AUTH_TOKEN_PATH`` (never in argv);
    Ray's own processes inherit the variables.
    """
    folder = Path(tempfile.mkdtemp(prefix="atropos-verl-ray-"))
    token = folder / "auth_token"
    descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    _reload_ray_config()
    return folder


@dataclass
class LocalRay:
    """A Ray instance this process started, and the folder of its token (None: the user's own settings)."""

    token_folder: Optional[Path]

    def stop(self) -> None:
        ray.shutdown()
        if self.token_folder is not None:
            shutil.rmtree(self.token_folder, ignore_errors=True)
            # The next local instance of this process (a Hydra multirun's next job) makes its own.
            for name in _RAY_TOKEN_VARIABLES:
                os.environ.pop(name, None)
            _reload_ray_config()


def ensure_ray(cfg: RunConfig, device: str, placement: Placement) -> Optional[LocalRay]:
    """Join ``trainer.ray_address``, or start a private local Ray instance with token authentication.

    A local instance sees only the GPUs ``placement`` gives the trainer's ranks.

    Returns the local instance when this call started one (None when it joined a
    cluster or Ray was already up). A cluster's own ``RAY_AUTH_*`` settings are the
    user's; so is an explicit ``RAY_AUTH_MODE`` for a local instance.
    """
    if ray.is_initialized():
        return None
    env_vars = {}
    if device == "cpu":
        # Workers unpickle PolicyWorker (importing this module) before verl picks a
        # platform; naming the plugin as well keeps that independent of import order.
        env_vars = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "atropos_verl.policy.platform_cpu"}
    if cfg.trainer.ray_address:
        # A cluster whose nodes all run on this machine's loopback (see _loopback_only_ray):
        # otherwise Ray would look for its GCS at the host's outward address.
        joining = _loopback_only_ray() if _loopback_address(cfg.trainer.ray_address) else nullcontext()
        with joining:
            ray.init(address=cfg.trainer.ray_address, runtime_env={"env_vars": env_vars})
        return None
    token_folder = None if "RAY_AUTH_MODE" in os.environ else _require_ray_token()
    num_cpus = cfg.trainer.ray_num_cpus or max(os.cpu_count() or 1, cfg.trainer.world_size)
    # Split placement: Ray's raylet (started now, inheriting this environment) sees only the
    # trainer's GPUs, so verl cannot put a rank on a replica's GPU.
    with _environment_variable("CUDA_VISIBLE_DEVICES", placement.ray_visible_devices), _loopback_only_ray():
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars})
    return LocalRay(token_folder)


def _loopback_address(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@contextmanager
def _environment_variable(name: str, value: Optional[str]) -> Iterator[None]:
    """``name`` set to ``value`` (None: left as it is) inside the block, as it was again after it."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def _loopback_only_ray() -> Iterator[None]:
    """A local Ray instance started inside the block listens on 127.0.0.1 only (GCS, raylet, workers, agents).

    Ray 2.60 on Linux replaces a loopback node address with the host's reachable one
    (``ray.init(_node_ip_address="127.0.0.1")`` included) and its servers then listen on
    every interface. With Ray's cluster mode off the node address stays 127.0.0.1 and so do
    its listeners (checked with ``ss -ltnp``; tests/unit/test_ray_auth.py). The variable is
    for the processes Ray starts (they inherit it at start), the constant for this one, which
    imported Ray already; both are as they were after the block, so that nothing else in the
    process (a later ``ray.init`` joining a cluster) finds cluster mode turned off.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environment_variable(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0"):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def _mean(value: Any) -> float:
    values = _as_list(value)
    return float(sum(float(v) for v in values) / max(len(values), 1))


def _total(value: Any) -> float:
    return float(sum(float(v) for v in _as_list(value)))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _regularizer_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """verl's names for the extra terms' means (atropos_verl.regularizers), where their tokens were in the batch."""
    metrics = {}
    for name, value_share, weight_share in RATIO_METRICS:
        if weight_share in raw and _total(raw[weight_share]) > 0:
            metrics[name] = _total(raw[value_share]) / _total(raw[weight_share])
    if "actor/entropy" in raw:
        metrics["actor/entropy"] = _mean(raw["actor/entropy"])
    return metrics


# Means over the trained tokens that have sampler log-probs, formed from their shares.
ROLLOUT_CORRECTION_MEANS = ("kl", "k3_kl", "rollout_is_mean", "rollout_is_truncated_fraction", "masked_fraction")


def rollout_correction(cfg: RolloutCorrectionConfig) -> RolloutCorrection:
    lower, upper = cfg.is_bounds()
    return RolloutCorrection(
        rollout_is=cfg.rollout_is,
        is_upper=upper,
        is_lower=lower,
        rejections=tuple(Rejection(option, upper=up, lower=low) for option, low, up in cfg.rejections()),
    )


class Actor:
    """Driver-side handle on the policy's FSDP2 workers."""

    def __init__(
        self,
        cfg: RunConfig,
        model_path: str,
        placement: Placement,
        worker_cls: type[PolicyWorker] = PolicyWorker,
        on_ray_started: Callable[[], None] | None = None,
    ):
        """``placement``: the run's (:func:`atropos_verl.placement.resolve_placement`), for the local Ray's GPUs.

        ``on_ray_started`` runs once Ray is connected (it replaces the SIGTERM handler), before the workers start."""
        self.cfg = cfg
        self.device = resolve_device(cfg.trainer.device)
        if self.device == "cpu":
            os.environ["VERL_PLATFORM"] = "cpu"
        # Set when this Actor started Ray: stopped, and its token folder removed, at shutdown.
        self._own_ray = ensure_ray(cfg, self.device, placement)
        if on_ray_started is not None:
            on_ray_started()
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
        self.regularizers = Regularizers.from_config(cfg.loss)
        self.workers.set_loss_fn(
            partial(
                verl_policy_loss,
                reduction=cfg.loss.reduction,
                clip_ratio=cfg.loss.clip_ratio,
                terms=self.regularizers,
                rollout_correction=rollout_correction(cfg.rollout_correction),
            )
        )
        self.workers.reset()
        if cfg.loss.ref_model:
            reference = model_path if cfg.loss.ref_model == "policy" else resolve_model_path(cfg.loss.ref_model)
            self.workers.load_reference(reference, cfg.model.attn_implementation, cfg.model.trust_remote_code)
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
        if self.regularizers.needs_entropy:
            tu.assign_non_tensor(batch, **{COMPUTE_ENTROPY: True})
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
            metrics["train/inference_logprob_abs_diff"] = (
                _total(raw["actor/inference_logprob_abs_diff_share"]) / sampled
            )
            for name in ROLLOUT_CORRECTION_MEANS:
                metrics[f"rollout_corr/{name}"] = _total(raw[f"rollout_corr/{name}_share"]) / sampled
            metrics["rollout_corr/rollout_is_max"] = max(float(v) for v in _as_list(raw["rollout_corr/rollout_is_max"]))
        if "actor/clip_fraction" in raw:
            metrics["train/clip_fraction"] = _mean(raw["actor/clip_fraction"])
        metrics.update(_regularizer_metrics(raw))
        if "mfu" in raw:
            metrics["perf/mfu"] = _mean(raw["mfu"])
        if "perf/max_memory_allocated_gb" in raw:
            metrics["perf/max_memory_allocated_gb"] = max(
                float(v) for v in _as_list(raw["perf/max_memory_allocated_gb"])
            )
        return metrics

    def export_weights(self, out_dir: str, bucket_bytes: int, dtype: str) -> dict[str, float]:
        """Full policy weights as safetensors buckets in ``out_dir`` (see PolicyWorker.export_weights)."""
        return self.workers.export_weights(out_dir, bucket_bytes, dtype)[0]

    def export_adapter(self, out_dir: str, dtype: str) -> dict[str, float]:
        """The LoRA adapter as a PEFT folder in ``out_dir`` (see PolicyWorker.export_adapter)."""
        return self.workers.export_adapter(out_dir, dtype)[0]

    def stage_weights_ipc(self, bucket_bytes: int, dtype: str) -> dict[str, Any]:
        """Full policy weights into rank 0's GPU buckets; their CUDA IPC updates (see PolicyWorker)."""
        return self.workers.stage_weights_ipc(bucket_bytes, dtype)[0]

    def release_weights_ipc(self) -> None:
        self.workers.release_weights_ipc()

    def stage_weights_tensors(self, bucket_bytes: int, dtype: str, payloads: int) -> dict[str, Any]:
        """Full policy weights into rank 0's buckets; ``payloads`` SGLang payloads of them (see PolicyWorker)."""
        return self.workers.stage_weights_tensors(bucket_bytes, dtype, payloads)[0]

    def weights_tensor_payloads(self, count: int) -> list[str]:
        return self.workers.weights_tensor_payloads(count)[0]

    def release_weights_tensors(self) -> None:
        self.workers.release_weights_tensors()

    def stage_weights_shm(self, path: str, dtype: str) -> dict[str, Any]:
        """Full policy weights into the shared-memory file at ``path``; its layout (see PolicyWorker)."""
        return self.workers.stage_weights_shm(path, dtype)[0]

    def release_weights_shm(self) -> None:
        self.workers.release_weights_shm()

    def nccl_manifest(self, dtype: str) -> dict[str, Any]:
        return self.workers.nccl_manifest(dtype)[0]

    def init_weights_nccl(self, master_address: str, master_port: int, world_size: int) -> None:
        self.workers.init_weights_nccl(master_address, master_port, world_size)

    def init_weights_sglang_group(
        self, master_address: str, master_port: int, world_size: int, backend: str, group_name: str, timeout_s: float
    ) -> None:
        self.workers.init_weights_sglang_group(master_address, master_port, world_size, backend, group_name, timeout_s)

    def send_weights_nccl(self, dtype: str, buffer_bytes: int) -> dict[str, float]:
        return self.workers.send_weights_nccl(dtype, buffer_bytes)[0]

    def release_weights_nccl(self) -> None:
        self.workers.release_weights_nccl()

    def gpu_uuid(self) -> str | None:
        """Rank 0's physical GPU, None on CPU."""
        return self.workers.gpu_uuid()[0]

    def log_probs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of each sequence under the current weights: entry t is log p(token t+1)."""
        batch = pack_sequences(sequences, self.batch_multiple)
        output = self.workers.infer_batch(batch).get()
        values = output["log_probs"]
        return [row.tolist()[: len(seq)] for row, seq in zip(values.unbind(), sequences)]

    def save_checkpoint(self, path: str, step: int) -> None:
        self.workers.save_checkpoint(path, global_step=step, max_ckpt_to_keep=None)
        if self.cfg.model.lora.enabled:
            # verl's LoRA-only shards resume training; the PEFT folder is what export and other tools read.
            self.export_adapter(os.path.join(path, CHECKPOINT_ADAPTER), "float32")

    def load_checkpoint(self, path: str) -> None:
        self.workers.load_checkpoint(path, del_local_after_load=False)

    def shutdown(self) -> None:
        """Stop the workers and free their placement groups (and Ray itself if this Actor started it)."""
        for worker in self.workers.workers:
            ray.kill(worker)
        for placement_group in self._pool.pgs or []:
            ray.util.remove_placement_group(placement_group)
        if self._own_ray is not None:
            self._own_ray.stop()
