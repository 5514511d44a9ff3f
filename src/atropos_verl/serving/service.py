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
import secrets
from pathlib import Path
from typing import Optional

from atropos_verl.assets import BUILTIN_PREFIX
from atropos_verl.config import ConfigError, EngineConfig, ModelConfig
from atropos_verl.netutil import free_port
from atropos_verl.placement import CPU_PLACEMENT, Placement
from atropos_verl.serving.gateway import Gateway
from atropos_verl.serving.lineage import PolicyLineage
from atropos_verl.serving.replicas import EngineError, InferenceReplica, ReplicaSpec
from atropos_verl.serving.replicas.access import TOKEN_HEADER
from atropos_verl.serving.sync import SyncReport, WeightSync, probe_sequences
from atropos_verl.serving.transports.base import PolicyWeights, WeightTransport
from atropos_verl.serving.transports.cuda_ipc import CudaIpcTransport, select_transport
from atropos_verl.serving.transports.folder import FolderTransport, default_weights_root
from atropos_verl.serving.transports.nccl import NcclTransport
from atropos_verl.serving.transports.sglang_nccl import SGLangNcclTransport, group_backend
from atropos_verl.serving.transports.sglang_tensor import SGLangTensorTransport
from atropos_verl.serving.transports.shared_memory import SharedMemoryTransport

logger = logging.getLogger(__name__)


def engine_dtype(engine: EngineConfig, trainer_dtype: str) -> str:
    """The dtype replicas compute in (and weights are exported in): by default the trainer's own."""
    return trainer_dtype if engine.dtype == "auto" else engine.dtype


def served_model_name(model: ModelConfig, model_path: str) -> str:
    """Environments name the policy by what the user gave (hub id or folder); builtin models by their folder.

    atroposlib clients also load their tokenizer from the model name when given none,
    so the name must be something ``AutoTokenizer`` can open.
    """
    return model_path if model.path.startswith(BUILTIN_PREFIX) else model.path


def replica_weight_transfer(engine: EngineConfig) -> str:
    """vLLM's native transfer backend a replica starts with (attach() picks the transport)."""
    if engine.kind != "vllm" or engine.weight_transport in ("folder", "shared_memory"):
        return "folder"
    return "nccl" if engine.weight_transport == "nccl" else "ipc"


def build_replicas(
    engine: EngineConfig,
    model: ModelConfig,
    model_path: str,
    dtype: str,
    log_dir: Path,
    access_token: str | None,
    placement: Placement = CPU_PLACEMENT,
) -> list[InferenceReplica]:
    replicas: list[InferenceReplica] = []
    for index in range(engine.replicas):
        spec = ReplicaSpec(
            model_path=model_path,
            served_model_name=served_model_name(model, model_path),
            dtype=dtype,
            max_model_len=engine.max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            tensor_parallel_size=engine.tensor_parallel_size,
            enable_sleep_mode=engine.sleep_during_training,
            weight_transfer=replica_weight_transfer(engine),
            extra_args=list(engine.extra_args),
            access_token=access_token,
            env=placement.replica_env(index),
            ray_resources=dict(engine.ray_resources),
        )
        if engine.kind == "vllm" and model.lora.enabled:
            from atropos_verl.serving.lora import LoraVLLMReplica

            replicas.append(LoraVLLMReplica(spec, name=f"vllm-{index}", log_dir=log_dir, lora_rank=model.lora.rank))
        elif engine.kind == "vllm":
            from atropos_verl.serving.replicas.vllm import VLLMReplica

            replicas.append(VLLMReplica(spec, name=f"vllm-{index}", log_dir=log_dir))
        else:
            from atropos_verl.serving.lora import LoraSGLangReplica
            from atropos_verl.serving.replicas.sglang import SGLangReplica

            common = dict(
                name=f"sglang-{index}",
                log_dir=log_dir,
                python=engine.python,
                attention_backend=engine.attention_backend,
            )
            if model.lora.enabled:
                lora = dict(lora_rank=model.lora.rank, target_modules=model.lora.target_modules)
                replicas.append(LoraSGLangReplica(spec, **common, **lora))
            else:
                replicas.append(SGLangReplica(spec, **common))
    return replicas


class NoServing:
    """``engine=external``: environments bring their own servers; weights go nowhere."""

    url: Optional[str] = None
    model_name: Optional[str] = None
    api_key: Optional[str] = None
    # Environments' own servers say nothing about which policy sampled what.
    lineage: Optional[PolicyLineage] = None

    async def start_gateway(self) -> None:
        pass

    async def start_replicas(self) -> None:
        pass

    async def attach(self, policy: PolicyWeights, policy_version: int, resumed: bool) -> None:
        pass

    async def before_training(self) -> None:
        pass

    async def after_training(self, policy_version: int, sequences: list[list[int]]) -> dict[str, float]:
        return {}

    async def detach(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class InferenceService:
    """Replicas + gateway + weight sync for ``engine=vllm|sglang``; :class:`NoServing` has the same face."""

    def __init__(
        self,
        engine: EngineConfig,
        model: ModelConfig,
        model_path: str,
        trainer_dtype: str,
        run_dir: Path,
        placement: Placement = CPU_PLACEMENT,
    ):
        self.engine = engine
        self.dtype = engine_dtype(engine, trainer_dtype)
        # Only this process and its gateway may reach the replicas (their dev routes included).
        replica_token = secrets.token_urlsafe(32)
        self.replicas = build_replicas(
            engine, model, model_path, self.dtype, run_dir / "engines", replica_token, placement
        )
        self.placement = placement
        self.model_name = served_model_name(model, model_path)
        self.lora = model.lora.enabled
        api_key = os.environ.get(engine.api_key_env) if engine.api_key_env else None
        if engine.api_key_env and not api_key:
            raise EngineError(f"engine.api_key_env names {engine.api_key_env!r}, which is not set")
        self.api_key = api_key
        self.lineage = PolicyLineage(engine.lineage_capacity)
        self.gateway = Gateway(
            [],
            model_name=self.model_name,
            host=engine.gateway_host,
            port=engine.gateway_port,
            api_key=api_key,
            max_wait_s=engine.max_wait,
            extra_ports=list(engine.gateway_extra_ports),
            max_model_len=engine.max_model_len,
            backend_headers={TOKEN_HEADER: replica_token},
            backend_engine=engine.kind,
            lineage=self.lineage,
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
        try:
            await self.gateway.start()
        except OSError as exc:
            # Preflight found the ports free; something took one since.
            ports = [self.engine.gateway_port, *self.engine.gateway_extra_ports]
            raise ConfigError(
                f"engine.gateway_port: the gateway cannot listen on {self.engine.gateway_host} port(s) "
                f"{', '.join(str(p) for p in ports if p)} ({exc.strerror or exc}); pick free ports or leave "
                "engine.gateway_port null"
            ) from None
        logger.info("gateway for environments: %s/v1 (model %s)", self.gateway.url, self.model_name)

    async def start_replicas(self) -> None:
        await asyncio.gather(*(replica.start(self.engine.startup_timeout) for replica in self.replicas))
        self.gateway.set_backends([replica.base_url for replica in self.replicas])

    async def attach(self, policy: PolicyWeights, policy_version: int, resumed: bool) -> None:
        """Connect the trainer's weights at ``policy_version`` (its step) and start watching replica health.

        A resumed run's replicas started from the base weights: they get the checkpoint's first,
        and until they hold it the gateway keeps stamping what they serve as version 0 (the
        export alone can take seconds, and a response stamped with the checkpoint's version
        would pass base-model samples off as on-policy).
        """
        transport = await self._make_transport(policy)
        self.weight_sync = WeightSync(
            policy,
            self.replicas,
            self.gateway,
            transport,
            check_threshold=self.engine.sync_check_threshold,
            drain_timeout_s=self.engine.drain_timeout,
            drain=self.engine.in_flight == "drain",
        )
        self._monitor_task = asyncio.create_task(self._monitor())
        if resumed:
            # Resumes the gateway at policy_version once every replica has loaded it.
            await self.sync(policy_version, probe=[])
        else:
            self.weight_sync.policy_version = policy_version
            self.gateway.resume(policy_version)

    async def _make_transport(self, policy: PolicyWeights) -> WeightTransport:
        """``engine.weight_transport``: auto is cuda_ipc when every replica is on the trainer's GPU,
        shared_memory for a CPU trainer, else folder; for SGLang both mean /update_weights_from_tensor."""
        bucket_bytes = self.engine.sync_bucket_mb << 20
        if self.lora:
            from atropos_verl.serving.lora import AdapterTransport

            logger.info("weight transport: lora_adapter (model.lora.rank > 0: only the adapter is synced)")
            return AdapterTransport(
                policy,  # type: ignore[arg-type]
                root=default_weights_root(),
                dtype=self.dtype,
                on_served=self.gateway.serve_adapter,
            )
        device = getattr(policy, "device", "cpu")
        setting = self.engine.weight_transport
        trainer_gpu, replica_gpus = None, {}
        if setting != "folder" and device == "cuda" and self.engine.kind == "vllm":
            trainer_gpu = await asyncio.to_thread(policy.gpu_uuid)  # type: ignore[attr-defined]
            replica_gpus = {r.name: await r.gpu_uuids() for r in self.replicas}  # type: ignore[attr-defined]
        elif setting != "folder" and device == "cuda":
            # SGLang reports no GPU identity: the placement's names say where each replica runs
            # (a replica on a Ray node of its own runs on another host's GPUs, whatever their names).
            trainer_gpu = self.placement.trainer_gpus[0] if self.placement.trainer_gpus else None
            remote = bool(self.engine.ray_resources)
            replica_gpus = {
                r.name: () if remote or i >= len(self.placement.replica_gpus) else self.placement.replica_gpus[i]
                for i, r in enumerate(self.replicas)
            }
        choice = select_transport(
            setting, device=device, engine_kind=self.engine.kind, trainer_gpu=trainer_gpu, replica_gpus=replica_gpus
        )
        if self.engine.kind == "sglang" and choice in ("cuda_ipc", "shared_memory"):
            logger.info(
                "weight transport: %s (engine.weight_transport=%s; SGLang /update_weights_from_tensor)", choice, setting
            )
            receivers = sum(r.tensor_parallel_size for r in self.replicas)  # type: ignore[attr-defined]
            return SGLangTensorTransport(
                policy,  # type: ignore[arg-type]
                medium=choice,
                dtype=self.dtype,
                receivers=receivers,
                bucket_bytes=bucket_bytes,
            )
        if self.engine.kind == "sglang" and choice == "nccl":
            logger.info("weight transport: nccl (SGLang /update_weights_from_distributed, %s)", group_backend(device))
            return SGLangNcclTransport(policy, dtype=self.dtype, device=device, buffer_bytes=bucket_bytes)  # type: ignore[arg-type]
        logger.info("weight transport: %s (engine.weight_transport=%s)", choice, setting)
        if choice == "cuda_ipc":
            return CudaIpcTransport(policy, dtype=self.dtype, bucket_bytes=bucket_bytes)  # type: ignore[arg-type]
        if choice == "nccl":
            return NcclTransport(policy, dtype=self.dtype, master_port=free_port(), buffer_bytes=bucket_bytes)  # type: ignore[arg-type]
        if choice == "shared_memory":
            return SharedMemoryTransport(policy, dtype=self.dtype)  # type: ignore[arg-type]
        return FolderTransport(policy, root=default_weights_root(), dtype=self.dtype, bucket_bytes=bucket_bytes)

    async def before_training(self) -> None:
        """Free accelerator memory for the update when replicas share the trainer's GPUs."""
        if self.engine.sleep_during_training:
            await self.gateway.pause(self.engine.drain_timeout)
            await asyncio.gather(*(replica.sleep() for replica in self.replicas))

    async def after_training(self, policy_version: int, sequences: list[list[int]]) -> dict[str, float]:
        """Sync ``policy_version`` into every replica, proven on the first of ``sequences``; its metrics.

        Only every ``engine.sync_interval``-th version is pushed; in between the replicas keep
        serving the last one pushed (``sync/policy_version``).
        """
        if policy_version % self.engine.sync_interval != 0:
            if self.engine.sleep_during_training:
                async with self._replica_lock:
                    await asyncio.gather(*(replica.wake_up() for replica in self.replicas))
                self.gateway.resume(self.gateway.policy_version)
            return {"sync/policy_version": self.gateway.policy_version}
        probe = probe_sequences(sequences, self.engine.max_model_len, self.engine.sync_probe_sequences)
        return (await self.sync(policy_version, probe)).as_metrics()

    async def sync(self, policy_version: int, probe: list[list[int]]) -> SyncReport:
        assert self.weight_sync is not None, "attach() the trainer before syncing"
        async with self._replica_lock:
            if self.engine.sleep_during_training:
                await asyncio.gather(*(replica.wake_up() for replica in self.replicas))
            # A replica that died since the monitor's last look would fail the sync: replace it first.
            await self._restart_unhealthy("found unhealthy before the weight sync")
            try:
                report = await self.weight_sync.sync(policy_version, probe)
            except EngineError as exc:
                # One that failed during the sync is replaced and the sync done again, once.
                if not await self._restart_unhealthy(f"failed during the sync of policy version {policy_version}"):
                    raise
                logger.warning(
                    "syncing policy version %d again after a replica failed mid-sync: %s", policy_version, exc
                )
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

    async def _monitor(self) -> None:
        """Restart a replica that fails ``engine.health_failures`` checks in a row (dead or hung).

        The gateway stops routing to it at once; it rejoins only after it has loaded
        the current policy, so environments never sample a stale one. Runs while the
        trainer waits for data too: a dead replica would otherwise starve the run.
        """
        failures = {replica.name: 0 for replica in self.replicas}
        while True:
            await asyncio.sleep(self.engine.health_interval)
            async with self._replica_lock:
                for replica in self.replicas:
                    failures[replica.name] = 0 if await replica.health() else failures[replica.name] + 1
                    if failures[replica.name] >= self.engine.health_failures:
                        await self._restart(replica, f"failed {failures[replica.name]} health checks in a row")
                        failures[replica.name] = 0

    async def _restart(self, replica: InferenceReplica, reason: str) -> None:
        logger.warning("%s %s: restarting it", replica, reason)
        self.gateway.set_backends([r.base_url for r in self.replicas if r is not replica])
        await replica.stop()
        await replica.start(self.engine.startup_timeout)
        if self.weight_sync is not None:
            await self.weight_sync.transport.restore(replica)
        self.gateway.set_backends([r.base_url for r in self.replicas])
        self.replicas_restarted += 1
        logger.info("%s restarted and serving policy version %d", replica, replica.policy_version)

    async def detach(self) -> None:
        """Stop watching replicas and release the weight transport, while the trainer's workers still run.

        The CUDA IPC transport frees buffers inside those workers; after they are gone a
        call to them would start a fresh Ray instance instead.
        """
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            try:
                await self._monitor_task
            except asyncio.CancelledError:
                pass
            self._monitor_task = None
        if self.weight_sync is not None:
            self.weight_sync.close()
            self.weight_sync = None

    async def stop(self) -> None:
        await self.detach()
        await self.gateway.stop()
        await asyncio.gather(*(replica.stop() for replica in self.replicas), return_exceptions=True)


def serving_for(
    engine: EngineConfig,
    model: ModelConfig,
    model_path: str,
    trainer_dtype: str,
    run_dir: Path,
    placement: Placement = CPU_PLACEMENT,
) -> InferenceService | NoServing:
    """What the run serves the policy with: replicas behind a gateway, or nothing (``engine=external``)."""
    if engine.kind == "external":
        return NoServing()
    return InferenceService(engine, model, model_path, trainer_dtype, run_dir, placement)
