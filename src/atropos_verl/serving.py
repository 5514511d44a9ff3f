"""The inference side the trainer runs: replicas + gateway + weight sync, started and stopped as one.

``engine.kind=external`` needs none of this (environments bring their own
servers); ``vllm`` and ``sglang`` start ``engine.replicas`` servers from the
policy's starting weights, put the gateway in front of them, and after every
optimizer step push the new weights and prove the replicas hold them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Optional

from atropos_verl.assets import BUILTIN_PREFIX
from atropos_verl.config import RunConfig
from atropos_verl.engines import EngineError, InferenceReplica, ReplicaSpec
from atropos_verl.gateway import Gateway
from atropos_verl.sync import PolicyExporter, SyncReport, WeightSync, default_weights_root

logger = logging.getLogger(__name__)


def engine_dtype(cfg: RunConfig, model_path: str) -> str:
    """The dtype replicas compute in, and therefore the one weights are exported in."""
    if cfg.engine.dtype != "auto":
        return cfg.engine.dtype
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return "float32" if "float32" in dtype else "bfloat16"


def build_replicas(cfg: RunConfig, model_path: str, log_dir: Path) -> list[InferenceReplica]:
    dtype = engine_dtype(cfg, model_path)
    replicas: list[InferenceReplica] = []
    for index in range(cfg.engine.replicas):
        spec = ReplicaSpec(
            model_path=model_path,
            served_model_name=served_model_name(cfg, model_path),
            dtype=dtype,
            max_model_len=cfg.engine.max_model_len,
            gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
            tensor_parallel_size=cfg.engine.tensor_parallel_size,
            enable_sleep_mode=cfg.engine.sleep_during_training,
            extra_args=list(cfg.engine.extra_args),
        )
        if cfg.engine.kind == "vllm":
            from atropos_verl.engines.vllm import VLLMReplica

            replicas.append(VLLMReplica(spec, name=f"vllm-{index}", log_dir=log_dir))
        else:
            from atropos_verl.engines.sglang import SGLangReplica

            replicas.append(SGLangReplica(spec, name=f"sglang-{index}", log_dir=log_dir))
    return replicas


def served_model_name(cfg: RunConfig, model_path: str) -> str:
    """Environments name the policy by what the user gave (hub id or folder); builtin models by their folder.

    atroposlib clients also load their tokenizer from the model name when given none,
    so the name must be something ``AutoTokenizer`` can open.
    """
    return model_path if cfg.model.path.startswith(BUILTIN_PREFIX) else cfg.model.path


class InferenceService:
    def __init__(self, cfg: RunConfig, model_path: str, run_dir: Path):
        self.cfg = cfg
        self.model_path = model_path
        self.replicas = build_replicas(cfg, model_path, run_dir / "engines")
        self.model_name = served_model_name(cfg, model_path)
        api_key = os.environ.get(cfg.engine.api_key_env) if cfg.engine.api_key_env else None
        if cfg.engine.api_key_env and not api_key:
            raise EngineError(f"engine.api_key_env names {cfg.engine.api_key_env!r}, which is not set")
        self.api_key = api_key
        self.gateway = Gateway(
            [],
            model_name=served_model_name(cfg, model_path),
            host=cfg.engine.gateway_host,
            port=cfg.engine.gateway_port,
            api_key=api_key,
            max_wait_s=cfg.engine.max_wait,
            extra_ports=list(cfg.engine.gateway_extra_ports),
        )
        self.weight_sync: Optional[WeightSync] = None
        # Syncs and restarts both reconfigure replicas; one at a time.
        self._replica_lock = asyncio.Lock()
        self._monitor_task: Optional[asyncio.Task] = None
        self.replicas_restarted = 0

    @property
    def url(self) -> str:
        return self.gateway.url

    async def start_gateway(self) -> None:
        """The gateway comes up first so environments can connect early: their requests wait for replicas."""
        await self.gateway.start()
        logger.info("gateway for environments: %s/v1 (model %s)", self.gateway.url, self.model_name)

    async def start_replicas(self) -> None:
        await asyncio.gather(*(replica.start(self.cfg.engine.startup_timeout) for replica in self.replicas))
        self.gateway.set_backends([replica.base_url for replica in self.replicas])

    def attach(self, exporter: PolicyExporter, policy_version: int) -> None:
        """Connect the trainer's weights; ``policy_version`` is the trainer step the replicas start at."""
        self.weight_sync = WeightSync(
            exporter,
            self.replicas,
            self.gateway,
            weights_root=default_weights_root(),
            dtype=engine_dtype(self.cfg, self.model_path),
            bucket_bytes=self.cfg.engine.sync_bucket_mb << 20,
            check_threshold=self.cfg.engine.sync_check_threshold,
            drain_timeout_s=self.cfg.engine.drain_timeout,
        )
        self.weight_sync.policy_version = policy_version
        self.gateway.resume(policy_version)

    async def before_training(self) -> None:
        """Free accelerator memory for the update when replicas share the trainer's GPUs."""
        if self.cfg.engine.sleep_during_training:
            await self.gateway.pause(self.cfg.engine.drain_timeout)
            await asyncio.gather(*(replica.sleep() for replica in self.replicas))

    async def sync(self, policy_version: int, probe: list[list[int]]) -> SyncReport:
        assert self.weight_sync is not None, "attach() the trainer before syncing"
        async with self._replica_lock:
            if self.cfg.engine.sleep_during_training:
                await asyncio.gather(*(replica.wake_up() for replica in self.replicas))
            # A replica that died since the monitor's last look would fail the sync: replace it first.
            await self._restart_unhealthy("found unhealthy before the weight sync")
            try:
                report = await self.weight_sync.sync(policy_version, probe)
            except EngineError as exc:
                # One that failed during the sync is replaced and the sync done again, once.
                if not await self._restart_unhealthy(f"failed during the sync of policy version {policy_version}"):
                    raise
                logger.warning("syncing policy version %d again after a replica failed mid-sync: %s", policy_version, exc)
                report = await self.weight_sync.sync(policy_version, probe)
        report.replicas_restarted = self.replicas_restarted
        return report

    async def _restart_unhealthy(self, reason: str) -> int:
        """Restart every replica that fails one health check now; returns how many."""
        healthy = await asyncio.gather(*(replica.health() for replica in self.replicas))
        for replica, ok in zip(self.replicas, healthy):
            if not ok:
                await self._restart(replica, reason)
        return healthy.count(False)

    def start_monitor(self) -> None:
        """Watch replica health while the trainer runs; see :meth:`_monitor`."""
        self._monitor_task = asyncio.create_task(self._monitor())

    async def _monitor(self) -> None:
        """Restart a replica that fails ``engine.health_failures`` checks in a row (dead or hung).

        The gateway stops routing to it at once; it rejoins only after it has loaded
        the current policy, so environments never sample a stale one. Runs while the
        trainer waits for data too: a dead replica would otherwise starve the run.
        """
        failures = {replica.name: 0 for replica in self.replicas}
        while True:
            await asyncio.sleep(self.cfg.engine.health_interval)
            async with self._replica_lock:
                for replica in self.replicas:
                    failures[replica.name] = 0 if await replica.health() else failures[replica.name] + 1
                    if failures[replica.name] >= self.cfg.engine.health_failures:
                        await self._restart(replica, f"failed {failures[replica.name]} health checks in a row")
                        failures[replica.name] = 0

    async def _restart(self, replica: InferenceReplica, reason: str) -> None:
        logger.warning("%s %s: restarting it", replica, reason)
        self.gateway.set_backends([r.base_url for r in self.replicas if r is not replica])
        await replica.stop()
        await replica.start(self.cfg.engine.startup_timeout)
        if self.weight_sync is not None and self.weight_sync.current_weights is not None:
            await replica.load_weights(str(self.weight_sync.current_weights), self.weight_sync.policy_version)
        self.gateway.set_backends([r.base_url for r in self.replicas])
        self.replicas_restarted += 1
        logger.info("%s restarted and serving policy version %d", replica, replica.policy_version)

    async def stop(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            try:
                await self._monitor_task
            except asyncio.CancelledError:
                pass
        await self.gateway.stop()
        await asyncio.gather(*(replica.stop() for replica in self.replicas), return_exceptions=True)
        if self.weight_sync is not None:
            self.weight_sync.close()
