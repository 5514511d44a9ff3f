"""Serving a LoRA policy: vLLM and SGLang replicas hold the base model once and take each new adapter hot.

With ``model.lora.rank > 0`` a sync moves only the adapter (a few MB instead of the model):

* :class:`LoraVLLMReplica` starts vLLM with ``--enable-lora`` and runtime adapter loading
  (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which adds ``/v1/load_lora_adapter`` and
  ``/v1/unload_lora_adapter``); its base weights are never reloaded;
* :class:`LoraSGLangReplica` does the same with SGLang's ``--enable-lora``, ``/load_lora_adapter``
  and ``/unload_lora_adapter``;
* :class:`AdapterTransport` writes the trainer's adapter as a PEFT folder on tmpfs and has
  every replica load it under a new name per policy version (:func:`adapter_name`);
* the gateway sends requests for the policy (envs name the base model) to the current
  adapter's name (vLLM: as the model, SGLang: as ``lora_path``), switched while the replicas
  are paused, so the version it stamps on a response is the adapter that produced it.

A new name per version rather than an in-place reload: vLLM keys its prefix cache and its
loaded adapters by name, so no KV or weights of an older adapter can be mistaken for the new
one; a request still running on the previous adapter finishes on it. The proof after each sync
(atropos_verl.serving.sync) compares the trainer's log-probs, base + adapter as PEFT computes
them, with the replica's under the new adapter's name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Protocol

from atropos_verl.config import VLLM_LORA_RANKS
from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.replicas.base import ReplicaSpec
from atropos_verl.serving.replicas.sglang import SGLangReplica
from atropos_verl.serving.replicas.vllm import VLLMReplica
from atropos_verl.serving.transports.base import PolicyWeights
from atropos_verl.serving.transports.folder import VersionFolderTransport

logger = logging.getLogger(__name__)

# Adapters a replica keeps loaded: the current one, and the previous one for requests still running on it.
LOADED_ADAPTERS = 2


def adapter_name(version: int) -> str:
    return f"policy-lora-v{version}"


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM's ``--max-lora-rank`` accepts that holds ``rank``."""
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


class AdapterReceiver(Protocol):
    name: str
    policy_version: int

    async def load_adapter(self, folder: str, version: int) -> None: ...


class AdapterPolicy(PolicyWeights, Protocol):
    def export_adapter(self, out_dir: str, dtype: str) -> dict[str, float]: ...


class _AdapterServing:
    """What a LoRA replica of either engine keeps: the adapters its server holds, and which one it serves.

    The engine subclass says how to load, unload and label (``_load_adapter``, ``_unload_adapter``,
    ``_label_weights``); the bookkeeping and the eviction order are the same for both.
    """

    policy_version: int
    last_load_seconds: float

    def __init__(self, *args, lora_rank: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora_rank = lora_rank
        # Names loaded in this server process, oldest first; the last is the one served.
        self._adapters: list[str] = []

    @property
    def adapter(self) -> Optional[str]:
        return self._adapters[-1] if self._adapters else None

    async def _after_start(self) -> None:
        # A (re)started server holds no adapter: it serves the base weights until the transport restores one.
        self._adapters = []
        self.policy_version = 0
        await super()._after_start()

    async def load_weights(self, weights_dir: str, version: int) -> None:
        raise EngineError(f"{self}: serves a LoRA policy; it takes adapters (load_adapter), not full weights")

    async def load_adapter(self, folder: str, version: int) -> None:
        """Load the PEFT folder as policy ``version``'s adapter and serve it; drop any older than the previous."""
        name = adapter_name(version)
        started = time.perf_counter()
        if name not in self._adapters:
            await self._load_adapter(name, str(Path(folder).resolve()))
        else:
            self._adapters.remove(name)
        self._adapters.append(name)
        while len(self._adapters) > LOADED_ADAPTERS:
            await self._unload_adapter(self._adapters.pop(0))
        self.last_load_seconds = time.perf_counter() - started
        await self._label_weights(version)
        self.policy_version = version
        logger.info(
            "%s: serving adapter %s (policy version %d), loaded in %.3fs", self, name, version, self.last_load_seconds
        )

    async def _load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    async def _unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    async def _label_weights(self, version: int) -> None:
        raise NotImplementedError


class LoraVLLMReplica(_AdapterServing, VLLMReplica):
    """A vLLM server serving the base model plus the trainer's latest LoRA adapter."""

    @property
    def request_model_name(self) -> str:
        return self.adapter or self._spec.served_model_name

    def command(self, port: int) -> list[str]:
        cmd = super().command(port)
        lora = [
            "--enable-lora",
            "--max-lora-rank", str(vllm_max_lora_rank(self.lora_rank)),
            "--max-loras", str(LOADED_ADAPTERS),
            "--max-cpu-loras", str(LOADED_ADAPTERS),
        ]  # fmt: skip
        return _before_extra_args(cmd, lora, self._spec)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        return env

    async def _load_adapter(self, name: str, path: str) -> None:
        await self._server.request("POST", "/v1/load_lora_adapter", body={"lora_name": name, "lora_path": path})

    async def _unload_adapter(self, name: str) -> None:
        await self._server.request("POST", "/v1/unload_lora_adapter", body={"lora_name": name})

    async def _label_weights(self, version: int) -> None:
        await self._set_weight_version(version)


class LoraSGLangReplica(_AdapterServing, SGLangReplica):
    """An SGLang server serving the base model plus the trainer's latest LoRA adapter.

    SGLang 0.5.12 (checked live on CPU): ``--enable-lora`` with ``--max-lora-rank`` and
    ``--lora-target-modules`` starts with no adapter; ``POST /load_lora_adapter {"lora_name",
    "lora_path"}`` and ``/unload_lora_adapter {"lora_name"}`` answer ``success`` (400 for an
    unknown name); a request picks an adapter by name with ``lora_path`` (native ``/generate`` and
    the OpenAI routes alike; the gateway adds it). A request naming an adapter unloaded earlier
    makes SGLang load it again from its folder, so a request held across two syncs still runs.
    On CPU the LoRA kernels are ``torch_native`` (the default, csgmv, is Triton); the launcher
    turns off the host-memory pinning those layers ask for.
    """

    def __init__(self, *args, target_modules: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target_modules = list(target_modules)

    @property
    def lora_backend(self) -> Optional[str]:
        """SGLang's LoRA kernels: its default on CUDA, the PyTorch ones on CPU."""
        return None if self.on_cuda else "torch_native"

    def command(self, port: int) -> list[str]:
        cmd = super().command(port)
        # SGLang's "all" is resolved against the model's layers, as PEFT's all-linear is.
        modules = ["all"] if self.target_modules == ["all-linear"] else self.target_modules
        lora = [
            "--enable-lora",
            "--max-lora-rank", str(self.lora_rank),
            "--lora-target-modules", *modules,
            "--max-loras-per-batch", str(LOADED_ADAPTERS),
        ]  # fmt: skip
        if self.lora_backend:
            lora += ["--lora-backend", self.lora_backend]
        return _before_extra_args(cmd, lora, self._spec)

    @property
    def request_fields(self) -> dict[str, str]:
        return {"lora_path": self.adapter} if self.adapter else {}

    async def _load_adapter(self, name: str, path: str) -> None:
        body = await self._server.request("POST", "/load_lora_adapter", body={"lora_name": name, "lora_path": path})
        if not isinstance(body, dict) or body.get("success") is not True:
            raise EngineError(f"{self}: loading adapter {name} from {path} failed: {body!r}")

    async def _unload_adapter(self, name: str) -> None:
        await self._server.request("POST", "/unload_lora_adapter", body={"lora_name": name})

    async def _label_weights(self, version: int) -> None:
        # abort_all_requests defaults to true there: requests still running on the previous adapter finish on it.
        await self._server.request(
            "POST", "/update_weight_version", body={"new_version": str(version), "abort_all_requests": False}
        )


def _before_extra_args(cmd: list[str], flags: list[str], spec: ReplicaSpec) -> list[str]:
    """``flags`` inserted before ``spec.extra_args``, which must stay last so their flags win."""
    at = len(cmd) - len(spec.extra_args)
    return cmd[:at] + flags + cmd[at:]


class AdapterTransport(VersionFolderTransport):
    """The trainer's LoRA adapter as a PEFT folder ``<root>/v<version>``, loaded by every replica by name.

    ``on_served(name)`` runs once every replica holds the new adapter, while they are still
    paused: the gateway switches to it there. The previous version's folder is kept (a
    replica may reload an adapter it evicted for a request still running on it).
    """

    name = "lora_adapter"
    kept_previous = 1

    def __init__(
        self, policy: AdapterPolicy, *, root: Path, dtype: str, on_served: Callable[[Optional[str]], None]
    ) -> None:
        super().__init__(policy, root=root, dtype=dtype)
        self.on_served = on_served

    def export(self, out_dir: Path) -> dict[str, float]:
        return self.policy.export_adapter(str(out_dir), self.dtype)

    async def load(self, replica: AdapterReceiver, folder: Path, version: int) -> None:
        await replica.load_adapter(str(folder), version)

    def served(self, version: int) -> None:
        self.on_served(adapter_name(version))
