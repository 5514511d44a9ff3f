"""The contract between the trainer (and gateway) and one inference server process.

A replica serves the current policy over the OpenAI API and lets the trainer swap its
weights between training steps. Engines differ in what they can do to in-flight
requests and accelerator memory; each implementation documents its choices.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from atropos_verl.serving.errors import EngineError

__all__ = ["EngineError", "InferenceReplica", "ReplicaSpec"]


@dataclass
class ReplicaSpec:
    """What to launch: the model, where to listen, and the engine's resource knobs."""

    model_path: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int | None = None
    """None: pick a free port at start."""
    dtype: str = "auto"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    weight_transfer: str = "folder"
    """``ipc``: also start the engine's native CUDA IPC weight transfer (vLLM on CUDA); folder loads always work."""
    extra_args: list[str] = field(default_factory=list)
    """Appended last to the engine's command line, so they override the adapter's defaults."""
    env: dict[str, str] = field(default_factory=dict)
    """Applied over the inherited environment and the adapter's defaults."""
    access_token: str | None = None
    """The run's replica token (see ``replicas.access``): every request but /health must carry it."""
    ray_resources: dict[str, float] = field(default_factory=dict)
    """Start it on a Ray node with these resources (``host`` is then that node's IP); empty: locally."""


class InferenceReplica(abc.ABC):
    """One inference server process that the trainer starts, updates and stops."""

    name: str
    policy_version: int
    """The version passed to the last successful `load_weights`; 0 = the weights it started with."""

    @property
    @abc.abstractmethod
    def base_url(self) -> str:
        """``http://host:port``; the OpenAI routes are under ``/v1``."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""

    @abc.abstractmethod
    async def start(self, timeout_s: float) -> None:
        """Launch and return once the server is healthy; EngineError (with the log tail) otherwise."""

    @abc.abstractmethod
    async def stop(self, timeout_s: float = 10) -> None:
        """Stop the process (by PID) and wait for its port to close; a no-op when not running."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the server process runs and its health route answers OK."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop scheduling; in-flight requests are held rather than aborted where the engine allows."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Undo `pause`; held and queued requests continue."""

    @abc.abstractmethod
    async def load_weights(self, weights_dir: str, version: int) -> None:
        """Replace all weights from a folder of safetensors files (HF names) and record `version`."""

    @abc.abstractmethod
    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """Entry t: log p(token t | tokens before t) under the serving weights; entry 0 is None.

        Computed afresh (no cached KV), so it proves which weights the replica serves.
        """

    @abc.abstractmethod
    async def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (level 1: offload weights, drop KV cache; level 2: drop both)."""

    @abc.abstractmethod
    async def wake_up(self) -> None:
        """Restore what `sleep` freed and resume scheduling."""
