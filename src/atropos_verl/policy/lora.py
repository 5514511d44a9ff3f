"""The trainer's side of LoRA: what verl's PEFT path leaves out, and the adapter as a PEFT folder.

verl 0.9.1 wraps the policy with PEFT when ``lora_rank > 0`` (``FSDPEngine._build_lora_module``):
the base weights are frozen, only the ``lora_A``/``lora_B`` matrices get gradients and optimizer
state. It passes no dropout to PEFT, so :func:`set_dropout` adds it afterwards.

A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's own names)
is what vLLM's ``/v1/load_lora_adapter`` reads, what ``peft.PeftModel.from_pretrained`` opens, and
what each checkpoint keeps beside verl's shards (atropos_verl.lora_export turns it into a model).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# In each checkpoint's actor folder, beside verl's shards.
CHECKPOINT_ADAPTER = "lora_adapter"


def peft_model(module: torch.nn.Module) -> Any:
    """The PEFT model inside verl's engine module, or None when LoRA is off."""
    inner = getattr(module, "_fsdp_wrapped_module", module)
    return inner if hasattr(inner, "peft_config") else None


def set_dropout(module: torch.nn.Module, p: float) -> int:
    """Put dropout of probability ``p`` on the input of every LoRA layer's adapter; returns how many layers.

    PEFT builds an identity there when created with ``lora_dropout=0``; its config is updated too
    so that a saved adapter says what it was trained with.
    """
    from peft.tuners.lora import LoraLayer

    model = peft_model(module)
    if model is None or p == 0:
        return 0
    layers = 0
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = torch.nn.Dropout(p)
            layers += 1
    for config in model.peft_config.values():
        config.lora_dropout = p
    return layers


def adapter_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapter matrix in full, under PEFT's saved names; every rank must walk it (each is an all-gather)."""
    from peft.utils.save_and_load import get_peft_model_state_dict

    model = peft_model(module)
    if model is None:
        raise RuntimeError("the policy has no LoRA adapter (model.lora.rank is 0)")
    for name, tensor in get_peft_model_state_dict(model).items():
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def adapter_config(module: torch.nn.Module) -> dict[str, Any]:
    config = peft_model(module).peft_config["default"].to_dict()
    # Sets (PEFT's resolved target modules) are not JSON.
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def write_adapter(module: torch.nn.Module, out_dir: str, *, writer: bool, dtype: str) -> dict[str, float]:
    """Write the adapter as a PEFT folder into ``out_dir`` (only when ``writer``); its size and time."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    target = torch.float32 if dtype == "float32" else torch.bfloat16
    tensors = {name: tensor.detach().to("cpu", dtype=target).contiguous() for name, tensor in adapter_tensors(module)}
    if not writer:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as handle:
        json.dump(adapter_config(module), handle, indent=2, default=str)
    return {
        "bytes": float(sum(t.numel() * t.element_size() for t in tensors.values())),
        "tensors": float(len(tensors)),
        "seconds": time.perf_counter() - start,
    }
