"""Which GPUs of this node the trainer's ranks and each inference replica use.

Two layouts (``engine.placement``):

* ``colocate`` (default): replicas share the trainer's GPUs; replica *i* takes the trainer's
  GPUs ``i*tp .. i*tp+tp-1``. Their memory is split by ``engine.gpu_memory_utilization``
  (and freed around each update with ``engine.sleep_during_training``);
* ``split``: replicas get GPUs of their own, ``engine.gpus`` (``tp`` consecutive entries per
  replica; empty: the GPUs after the trainer's), and the local Ray instance sees only the
  trainer's, so verl cannot place a rank on a replica's GPU.

GPUs are named as the node names them (``CUDA_VISIBLE_DEVICES`` entries when it is set, else
``0..n-1``), and each replica is started with its own ``CUDA_VISIBLE_DEVICES``. The check runs
before anything starts: asking for more GPUs than are visible is an error naming the key, not
a hang inside verl or Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from atropos_verl.config import ConfigError, EngineConfig, TrainerConfig


@dataclass(frozen=True)
class Placement:
    trainer_gpus: tuple[str, ...]
    replica_gpus: tuple[tuple[str, ...], ...]
    # Set when the local Ray instance must see only the trainer's GPUs (split placement).
    ray_visible_devices: Optional[str] = None

    @property
    def colocated(self) -> bool:
        return all(set(gpus) <= set(self.trainer_gpus) for gpus in self.replica_gpus)

    def replica_env(self, index: int) -> dict[str, str]:
        """The environment that pins replica ``index`` to its GPUs (nothing on CPU)."""
        gpus = self.replica_gpus[index] if index < len(self.replica_gpus) else ()
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}


CPU_PLACEMENT = Placement(trainer_gpus=(), replica_gpus=())


def node_gpus() -> list[str]:
    """The GPUs this process can see."""
    import torch

    return visible_gpus(torch.cuda.device_count() if torch.cuda.is_available() else 0)


def visible_gpus(count: int, environ: Optional[dict[str, str]] = None) -> list[str]:
    """This node's GPUs as a child process would name them in ``CUDA_VISIBLE_DEVICES``."""
    environ = os.environ if environ is None else environ
    listed = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if "CUDA_VISIBLE_DEVICES" in environ else [str(i) for i in range(count)]


def node_placement(trainer: TrainerConfig, engine: EngineConfig, device: str) -> Placement:
    """:func:`resolve_placement` on the GPUs this process can see."""
    return resolve_placement(trainer, engine, device, node_gpus() if device == "cuda" else [])


def resolve_placement(trainer: TrainerConfig, engine: EngineConfig, device: str, gpus: Sequence[str]) -> Placement:
    """Placement of the run's trainer ranks and replicas on this node's ``gpus``; ConfigError if it cannot be."""
    if device != "cuda":
        return CPU_PLACEMENT
    visible = list(gpus)
    joining_cluster = trainer.ray_address is not None or trainer.nnodes > 1
    local_ranks = trainer.n_gpus_per_node
    if not joining_cluster and local_ranks > len(visible):
        raise ConfigError(
            f"trainer.n_gpus_per_node: {local_ranks} GPUs asked for, {len(visible)} visible "
            f"({', '.join(visible) or 'none'}); set trainer.n_gpus_per_node<={len(visible)}"
        )
    trainer_gpus = tuple(visible[:local_ranks])
    if engine.kind == "external":
        return Placement(trainer_gpus=trainer_gpus, replica_gpus=())
    tp, replicas = engine.tensor_parallel_size, engine.replicas
    needed = tp * replicas
    if engine.placement == "colocate":
        if needed > len(trainer_gpus):
            raise ConfigError(
                f"engine.replicas x engine.tensor_parallel_size: {replicas} x {tp} GPUs do not fit on the trainer's "
                f"{len(trainer_gpus)} GPU(s) with engine.placement=colocate; use fewer replicas, or "
                "engine.placement=split with engine.gpus"
            )
        shares = tuple(trainer_gpus[i * tp : (i + 1) * tp] for i in range(replicas))
        return Placement(trainer_gpus=trainer_gpus, replica_gpus=shares)
    own = [str(g) for g in engine.gpus] if engine.gpus else visible[local_ranks:]
    unknown = [g for g in own if g not in visible]
    if unknown:
        raise ConfigError(
            f"engine.gpus: {', '.join(unknown)} not among the visible GPUs ({', '.join(visible) or 'none'})"
        )
    shared = sorted(set(own) & set(trainer_gpus), key=own.index)
    if shared:
        raise ConfigError(
            f"engine.gpus: {', '.join(shared)} also hold trainer ranks (GPUs {', '.join(trainer_gpus)}); with "
            "engine.placement=split each GPU serves one side, or use engine.placement=colocate"
        )
    if len(own) < needed:
        raise ConfigError(
            f"engine.gpus: {replicas} replica(s) x tensor_parallel_size {tp} need {needed} GPUs, "
            f"{len(own)} given ({', '.join(own) or 'none'})"
        )
    groups = tuple(tuple(own[i * tp : (i + 1) * tp]) for i in range(replicas))
    ray_devices = None if joining_cluster else ",".join(trainer_gpus)
    return Placement(trainer_gpus=trainer_gpus, replica_gpus=groups, ray_visible_devices=ray_devices)
