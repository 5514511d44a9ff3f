"""A verl platform for machines without an accelerator.

verl 0.9.1 ships CUDA, NPU and ROCm platforms only; on a CPU-only host its
device helpers fall back to "cuda" and the FSDP engine cannot start. This
module registers a ``cpu`` platform so that the same trainer code runs the
FSDP2 engine on CPU (gloo collectives, fp32) for tests, CI and demos.

It is loaded in every process that imports verl through the ``verl.plugins``
entry point declared in pyproject.toml, and selected with ``VERL_PLATFORM=cpu``
(the trainer sets it for itself and its Ray workers when ``trainer.device=cpu``).
"""

from __future__ import annotations

import resource
import types
from contextlib import contextmanager

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _peak_rss_bytes(*_args, **_kwargs) -> int:
    # ru_maxrss is in KiB on Linux: the closest CPU analogue of a CUDA peak.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes(*_args, **_kwargs) -> int:
    return psutil.Process().memory_info().rss


def _mem_get_info(*_args, **_kwargs) -> tuple[int, int]:
    vm = psutil.virtual_memory()
    return vm.available, vm.total


def _noop(*_args, **_kwargs) -> None:
    return None


def _build_device_module() -> types.SimpleNamespace:
    """``torch.cpu`` plus the ``torch.cuda`` calls verl makes that ``torch.cpu`` lacks.

    Memory statistics report this process' resident memory, so verl's memory
    metrics stay meaningful on CPU instead of reading zero.
    """
    module = types.SimpleNamespace(
        **{name: getattr(torch.cpu, name) for name in dir(torch.cpu) if not name.startswith("_")}
    )
    module.empty_cache = _noop
    module.ipc_collect = _noop
    module.set_per_process_memory_fraction = _noop
    module.reset_peak_memory_stats = _noop
    module.mem_get_info = _mem_get_info
    module.memory_allocated = _rss_bytes
    module.memory_reserved = _rss_bytes
    module.max_memory_allocated = _peak_rss_bytes
    module.max_memory_reserved = _peak_rss_bytes
    module.get_rng_state = torch.get_rng_state
    module.set_rng_state = torch.set_rng_state
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_device_name = lambda *_a, **_k: "cpu"
    return module


_DEVICE_MODULE = _build_device_module()


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """Host CPU as a verl device: gloo for collectives, Ray ``CPU`` resources for placement."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.SimpleNamespace:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Auto-detection probes platforms in registration order and this one is
        # registered last; claim the host only when no CUDA device is visible.
        return not torch.cuda.is_available()

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def ray_resource_options(self, num_gpus: float) -> dict:
        return {"num_cpus": num_gpus}

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None
