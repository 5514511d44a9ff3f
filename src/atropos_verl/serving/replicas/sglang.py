"""One SGLang server process, controlled through SGLang's native HTTP routes.

Written against SGLang's HTTP server (``sglang/srt/entrypoints/http_server.py``, the
version verl 0.9.1 pins is 0.5.12); no SGLang build runs on the machines this project
was developed on, so this adapter has not been run against a live server.

- launch: ``python -m sglang.launch_server --model-path ... --host --port``; ready when
  ``GET /health`` answers 200.
- ``POST /pause_generation {"mode": "retract"}``: running requests go back to the waiting
  queue and are recomputed after ``POST /continue_generation`` (nothing is aborted, and
  no KV from the old weights survives a load).
- ``POST /update_weights_from_disk {"model_path", "weight_version", "flush_cache"}``:
  loads every safetensors file of the folder in place and labels the weights.
- ``POST /release_memory_occupation`` / ``/resume_memory_occupation``: frees and restores
  GPU memory; needs ``--enable-memory-saver`` at launch.
- prompt log-probs: ``POST /generate`` with ``return_logprob`` and
  ``logprob_start_len: 0`` returns ``meta_info.input_token_logprobs`` as
  ``[logprob, token_id, text]`` per prompt position (the first logprob is null).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from atropos_verl.serving.replicas.base import EngineError, ReplicaSpec
from atropos_verl.serving.replicas.server import ServerReplica
from atropos_verl.serving.transports.folder import require_weights

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


class SGLangReplica(ServerReplica):
    engine = "SGLang"

    def __init__(
        self,
        spec: ReplicaSpec,
        name: str = "sglang-0",
        log_dir: str | os.PathLike[str] | None = None,
        control_timeout_s: float = 300.0,
    ) -> None:
        if spec.dtype not in _DTYPES:
            raise EngineError(f"SGLang replica {name!r}: unsupported dtype {spec.dtype!r}")
        super().__init__(spec, name, log_dir, control_timeout_s)

    def command(self, port: int) -> list[str]:
        """The server's command line; ``spec.extra_args`` come last so their flags win."""
        spec = self._spec
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", spec.model_path,
            "--served-model-name", spec.served_model_name,
            "--host", spec.host,
            "--port", str(port),
            "--dtype", _DTYPES[spec.dtype],
            "--context-length", str(spec.max_model_len),
            "--mem-fraction-static", str(spec.gpu_memory_utilization),
            "--tp-size", str(spec.tensor_parallel_size),
        ]  # fmt: skip
        if spec.enable_sleep_mode:
            cmd.append("--enable-memory-saver")
        return cmd + list(spec.extra_args)

    async def pause(self) -> None:
        await self._server.request("POST", "/pause_generation", body={"mode": "retract"})

    async def resume(self) -> None:
        await self._server.request("POST", "/continue_generation", body={})

    async def load_weights(self, weights_dir: str, version: int) -> None:
        path = require_weights(self, weights_dir)
        started = time.perf_counter()
        body = await self._server.request(
            "POST",
            "/update_weights_from_disk",
            body={"model_path": str(path), "weight_version": str(version), "flush_cache": True},
        )
        if not isinstance(body, dict) or body.get("success") is not True:
            raise EngineError(f"{self}: loading {path} failed: {body!r}")
        self.policy_version = version
        logger.info("%s: loaded policy version %d from %s in %.3fs", self, version, path, time.perf_counter() - started)

    def _require_memory_saver(self, what: str) -> None:
        if not self._spec.enable_sleep_mode:
            raise EngineError(
                f"{self}: cannot {what}: start the replica with enable_sleep_mode "
                "(engine.sleep_during_training=true), which launches SGLang with --enable-memory-saver"
            )

    async def sleep(self, level: int = 1) -> None:
        self._require_memory_saver("sleep")
        tags = ["kv_cache"] if level == 1 else ["kv_cache", "weights"]
        await self._server.request("POST", "/release_memory_occupation", body={"tags": tags})

    async def wake_up(self) -> None:
        self._require_memory_saver("wake up")
        await self._server.request("POST", "/resume_memory_occupation", body={})

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        body = await self._server.request(
            "POST",
            "/generate",
            body={
                "input_ids": token_ids,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
            },
        )
        entries = body["meta_info"]["input_token_logprobs"]
        if len(entries) != len(token_ids):
            raise EngineError(f"{self}: {len(entries)} prompt log-probs for {len(token_ids)} prompt tokens")
        return [None] + [float(entry[0]) for entry in entries[1:]]
