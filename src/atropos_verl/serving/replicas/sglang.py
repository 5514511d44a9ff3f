"""One SGLang server process, controlled through SGLang's native HTTP routes.

Checked against a live SGLang 0.5.12 (the version verl 0.9.1 pins) on CPU; its behaviour on
the routes this adapter drives:

- launch: ``serving/sglang_launcher/launch.py`` (SGLang's server plus the replica token and a
  served-name fix, see there) under SGLang's own interpreter (``python``: SGLang needs other
  transformers pins than this project's venv); ready when ``GET /health`` answers 200. With
  ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0`` ``/health`` is a liveness answer; otherwise
  it runs a generation, which takes up to 20 s and answers 503 while paused.
- ``--attention-backend``: SGLang picks FA3 on Hopper when none is given; ``triton`` works on
  every CUDA GPU, ``torch_native`` is the one CPU backend.
- ``POST /pause_generation {"mode": M}``: ``abort`` aborts what is in flight and returns once
  nothing is (verl's choice); ``retract`` puts running requests back in the queue to be
  recomputed after ``POST /continue_generation``. Requests that arrive while paused wait.
  A ``retract`` pause followed by a load with ``flush_cache: true`` kills the 0.5.12
  scheduler ("Cache flush failed") when requests were retracted, so after a ``retract``
  pause the load keeps the cache: prefixes computed under the old weights may be reused.
- ``POST /update_weights_from_disk {"model_path", "weight_version", "flush_cache"}``: loads
  every safetensors file of the folder in place and labels the weights (``GET /model_info``
  reports the label as ``weight_version``).
- ``POST /update_weights_from_tensor {"serialized_named_tensors", "weight_version", "flush_cache"}``
  (``transports.sglang_tensor``): one base64 ``ForkingPickler`` dump of ``[(HF name, tensor)]``
  per TP rank, read by SGLang's tp worker with its restricted unpickler and loaded with
  ``model.load_weights``; the same label and flush rule as the disk load. Verified on CPU with
  the trainer's buckets in torch's ``file_system`` shared memory (opened by name by the
  unrelated server process; the default ``file_descriptor`` strategy cannot reach it): two
  versions through the same buckets match transformers' log-probs, and the end-to-end run
  syncs this way every step. A payload serves one load (each dump counts references the
  receiver gives back), so every load gets a fresh dump. The CUDA form (GPU buckets, the
  GPU's UUID in the handle) is the same code and has not run here.
- ``POST /init_weights_update_group {"master_address", "master_port", "rank_offset", "world_size",
  "group_name", "backend"}`` / ``/update_weights_from_distributed {"names", "dtypes", "shapes",
  "group_name", "load_format": "flattened_bucket", "weight_version", "flush_cache"}`` /
  ``/destroy_weights_update_group {"group_name"}`` (``transports.sglang_nccl``): each TP worker
  joins the trainer's torch process group as rank ``rank_offset + tp_rank`` (``dp_size`` must
  be 1), and each update call receives one broadcast bucket (the tensors' bytes back to back,
  HF names) and hands it to ``model.load_weights``; the scheduler blocks in the collective
  until the trainer broadcasts. ``backend`` is any torch backend: verified on CPU with
  ``gloo`` (two versions broadcast from the trainer match transformers' log-probs, labelled
  with ``weight_version``); ``nccl`` (split placement on GPUs) has not run here. SGLang's own
  group timeout is torch's default (30 min), so the transport bounds every call itself.
- ``POST /release_memory_occupation`` / ``/resume_memory_occupation {"tags": [...]}``: free and
  restore GPU memory (``--enable-memory-saver``, CUDA only). Resuming a tag that was not
  released kills the scheduler, and so does releasing while requests are queued.
- prompt log-probs: ``POST /generate`` with ``return_logprob`` and ``logprob_start_len: 0``
  returns ``meta_info.input_token_logprobs`` as ``[logprob, token_id, text]`` per prompt
  position (the first logprob is null).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

from atropos_verl.serving.replicas.base import EngineError, ReplicaSpec
from atropos_verl.serving.replicas.server import ServerReplica
from atropos_verl.serving.transports.folder import require_weights

logger = logging.getLogger(__name__)

SGLangPauseMode = Literal["abort", "retract"]

# The interpreter of SGLang's venv when ``python`` is not given (make sglang-cpu exports it).
PYTHON_ENV = "ATROPOS_VERL_SGLANG_PYTHON"
LAUNCHER = Path(__file__).resolve().parents[1] / "sglang_launcher" / "launch.py"

_DTYPES = ("float32", "bfloat16", "float16", "auto")
# Both sleep levels free the weights and the KV cache; the weights come back from SGLang's CPU
# copy (--enable-weights-cpu-backup), without which they would come back as garbage.
_SLEEP_TAGS = ("kv_cache", "weights")
# On CPU SGLang would size its KV pool from the host's memory; a few full contexts suffice for tests.
_CPU_MIN_KV_TOKENS = 4096


@functools.cache
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_attention_backend(cuda: bool) -> str:
    return "triton" if cuda else "torch_native"


class SGLangReplica(ServerReplica):
    """An SGLang server the trainer starts, pauses, reloads and stops.

    ``pause()`` uses ``pause_mode`` (default ``abort``, as verl does): the gateway drains its
    requests before a sync, so only those still running when the drain timed out are aborted.
    """

    engine = "SGLang"

    def __init__(
        self,
        spec: ReplicaSpec,
        name: str = "sglang-0",
        log_dir: str | os.PathLike[str] | None = None,
        control_timeout_s: float = 300.0,
        *,
        python: str | None = None,
        attention_backend: str | None = None,
        pause_mode: SGLangPauseMode = "abort",
    ) -> None:
        if spec.dtype not in _DTYPES:
            raise EngineError(f"SGLang replica {name!r}: unsupported dtype {spec.dtype!r} (one of {list(_DTYPES)})")
        if pause_mode not in ("abort", "retract"):
            raise EngineError(f"SGLang replica {name!r}: pause_mode must be abort or retract, got {pause_mode!r}")
        super().__init__(spec, name, log_dir, control_timeout_s)
        self.python = python or os.environ.get(PYTHON_ENV) or sys.executable
        self._attention_backend = attention_backend
        self._pause_mode: SGLangPauseMode = pause_mode
        # The memory tags released by the last sleep(): wake_up resumes exactly these.
        self._released: tuple[str, ...] = ()
        self.last_load_seconds = 0.0

    @property
    def on_cuda(self) -> bool:
        return _cuda_available()

    @property
    def attention_backend(self) -> str:
        return self._attention_backend or default_attention_backend(self.on_cuda)

    @property
    def request_fields(self) -> dict[str, str]:
        """Fields every request this replica makes for itself carries (a LoRA replica names its adapter)."""
        return {}

    def command(self, port: int) -> list[str]:
        """The server's command line; ``spec.extra_args`` come last so their flags win."""
        spec = self._spec
        cuda = _cuda_available()
        cmd = [
            self.python, str(LAUNCHER),
            "--model-path", spec.model_path,
            "--served-model-name", spec.served_model_name,
            "--host", self.host,
            "--port", str(port),
            "--dtype", spec.dtype,
            "--context-length", str(spec.max_model_len),
            "--tp-size", str(spec.tensor_parallel_size),
            "--attention-backend", self.attention_backend,
            "--weight-version", "0",
        ]  # fmt: skip
        if cuda:
            cmd += ["--mem-fraction-static", str(spec.gpu_memory_utilization)]
        else:
            # The verified CPU setup: no CUDA graphs, and no warm-up request (start-up cost only).
            cmd += ["--device", "cpu", "--disable-cuda-graph", "--skip-server-warmup"]
            cmd += ["--max-total-tokens", str(max(_CPU_MIN_KV_TOKENS, 4 * spec.max_model_len))]
        if spec.enable_sleep_mode:
            cmd += ["--enable-memory-saver", "--enable-weights-cpu-backup"]
        return cmd + list(spec.extra_args)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "0"
        if not _cuda_available():
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            # SGLang's CPU engine otherwise takes every core, next to the trainer on the same ones.
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self._spec.env)
        return env

    async def start(self, timeout_s: float) -> None:
        if not Path(self.python).is_file():
            raise EngineError(
                f"{self}: SGLang's interpreter {self.python} does not exist: build it with `make sglang-cpu` "
                f"(CPU) or name one with SGLang installed in engine.python or ${PYTHON_ENV}"
            )
        await super().start(timeout_s)

    async def _after_start(self) -> None:
        self._released = ()

    async def pause(self) -> None:
        await self._server.request("POST", "/pause_generation", body={"mode": self._pause_mode})

    async def resume(self) -> None:
        await self._server.request("POST", "/continue_generation", body={})

    async def model_info(self) -> dict:
        body = await self._server.request("GET", "/model_info")
        if not isinstance(body, dict):
            raise EngineError(f"{self}: /model_info answered {body!r}")
        return body

    async def weight_version(self) -> str:
        """SGLang's own label for its weights (``str(policy_version)`` once started)."""
        return str((await self.model_info())["weight_version"])

    async def load_weights(self, weights_dir: str, version: int) -> None:
        path = require_weights(self, weights_dir)
        started = time.perf_counter()
        body = await self._server.request(
            "POST",
            "/update_weights_from_disk",
            body={
                "model_path": str(path),
                "weight_version": str(version),
                # See the module notes: a flush after a retract pause kills the scheduler.
                "flush_cache": self._pause_mode == "abort",
            },
        )
        if not isinstance(body, dict) or body.get("success") is not True:
            raise EngineError(
                f"{self}: loading {path} failed: {body!r}\n"
                "The replica may hold a mix of old and new weights: load again or restart it."
            )
        self.last_load_seconds = time.perf_counter() - started
        self.policy_version = version
        logger.info("%s: loaded policy version %d from %s in %.3fs", self, version, path, self.last_load_seconds)

    @property
    def tensor_parallel_size(self) -> int:
        """SGLang's TP ranks: each reads its own payload of a tensor load."""
        return self._spec.tensor_parallel_size

    async def load_weights_tensors(self, payloads: list[str], version: int) -> None:
        """Load the trainer's staged buckets (``transports.sglang_tensor``): one payload per TP rank."""
        if len(payloads) != self.tensor_parallel_size:
            raise EngineError(
                f"{self}: {len(payloads)} tensor payloads for {self.tensor_parallel_size} TP ranks (one per rank)"
            )
        started = time.perf_counter()
        advice = (
            "The replica may hold a mix of old and new weights: load again or restart it "
            "(engine.weight_transport=folder loads from disk instead)."
        )
        try:
            body = await self._server.request(
                "POST",
                "/update_weights_from_tensor",
                body={
                    "serialized_named_tensors": payloads,
                    "weight_version": str(version),
                    # See the module notes: a flush after a retract pause kills the scheduler.
                    "flush_cache": self._pause_mode == "abort",
                },
            )
        except EngineError as exc:
            raise EngineError(f"{exc}\n{advice}") from exc
        if not isinstance(body, dict) or body.get("success") is not True:
            raise EngineError(f"{self}: loading policy version {version} from tensors failed: {body!r}\n{advice}")
        self.last_load_seconds = time.perf_counter() - started
        self.policy_version = version
        logger.info(
            "%s: loaded policy version %d from the trainer's tensors in %.3fs", self, version, self.last_load_seconds
        )

    @property
    def flushes_cache(self) -> bool:
        """Whether a load may flush the prefix cache (see the module notes: not after a retract pause)."""
        return self._pause_mode == "abort"

    async def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
    ) -> None:
        """Join the trainer's weight-update group (``transports.sglang_nccl``); returns once every rank joined."""
        body = await self._server.request(
            "POST",
            "/init_weights_update_group",
            body={
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )
        if not isinstance(body, dict) or body.get("success") is not True:
            raise EngineError(
                f"{self}: joining weight-update group {group_name} ({backend}, {master_address}:{master_port}, "
                f"ranks from {rank_offset} of {world_size}) failed: {body!r}; "
                "engine.weight_transport=folder loads from disk instead"
            )

    async def update_weights_from_distributed(self, body: dict, version: int, final: bool) -> None:
        """Receive one broadcast bucket (``body``: names, dtypes, shapes, group); ``final`` labels the weights."""
        started = time.perf_counter()
        advice = (
            "The replica may hold a mix of old and new weights: sync again or restart it "
            "(engine.weight_transport=folder loads from disk instead)."
        )
        try:
            answer = await self._server.request("POST", "/update_weights_from_distributed", body=body)
        except EngineError as exc:
            raise EngineError(f"{exc}\n{advice}") from exc
        if not isinstance(answer, dict) or answer.get("success") is not True:
            raise EngineError(f"{self}: receiving policy version {version} by broadcast failed: {answer!r}\n{advice}")
        self.last_load_seconds = time.perf_counter() - started
        if final:
            self.policy_version = version
            logger.info("%s: received policy version %d by broadcast", self, version)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._server.request("POST", "/destroy_weights_update_group", body={"group_name": group_name})

    def _require_memory_saver(self, what: str) -> None:
        if not self._spec.enable_sleep_mode:
            raise EngineError(
                f"{self}: cannot {what}: start the replica with enable_sleep_mode "
                "(engine.sleep_during_training=true), which launches SGLang with --enable-memory-saver "
                "(CUDA only)"
            )

    async def sleep(self, level: int = 1) -> None:
        """Abort what is still queued (SGLang releases memory only when idle), then free weights and KV."""
        self._require_memory_saver("sleep")
        if self._released:
            return
        await self._server.request("POST", "/pause_generation", body={"mode": "abort"})
        await self._server.request("POST", "/release_memory_occupation", body={"tags": list(_SLEEP_TAGS)})
        self._released = _SLEEP_TAGS

    async def wake_up(self) -> None:
        """Resume exactly what sleep() released, then scheduling."""
        self._require_memory_saver("wake up")
        if self._released:
            await self._server.request("POST", "/resume_memory_occupation", body={"tags": list(self._released)})
            self._released = ()
        await self.resume()

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        body = await self._server.request(
            "POST",
            "/generate",
            body={
                "input_ids": token_ids,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
                **self.request_fields,
            },
        )
        entries = body["meta_info"]["input_token_logprobs"]
        if len(entries) != len(token_ids):
            raise EngineError(f"{self}: {len(entries)} prompt log-probs for {len(token_ids)} prompt tokens")
        return [None] + [float(entry[0]) for entry in entries[1:]]
