"""verl's FSDP2 language-model engine with a lean padded-rows step and one read-back per mini-batch.

In the padded-rows layout (SDPA attention, no remove-padding) verl 0.9.1's
``FSDPEngineWithLMHead`` spends more host time per micro-batch than a 0.5B model
spends on the GPU (bench/RESULTS.md): it moves the micro-batch to the device as
nested tensors and pads them there (``.item()`` on the longest row), narrows the
logits back into a nested tensor and concatenates them (a copy of the full
logits), and reads the loss back with ``.item()`` before backward is launched.
Each read-back drains the GPU, which then waits for Python.

:class:`PolicyEngine` keeps everything else of verl's engine (FSDP2 module,
optimizer, micro-batch partition, gradient-sync deferral, checkpoints) and
changes four things:

* micro-batches (fixed-size, or verl's token-budget partition) are taken from
  the mini-batch one at a time (atropos_verl.policy.rows) just before their forward,
  and the loss normaliser is summed on the host: verl builds them all up front,
  re-nesting every row, and reads the token count back from the device, all
  while the GPU waits for its first kernel;
* the padded-rows step pads on the host, where the row lengths already are,
  copies the rows to the device from pinned memory without waiting for the GPU,
  and takes the log-probs of the padded logits directly; the loss receives the
  same packed log-probs and inputs as from verl's step;
* losses, and metrics the loss function returns as tensors, stay on the device
  until every micro-batch's backward has been launched, then come back in one copy;
* the optimizer step clips gradients on each rank's local shards (one all-reduce
  of the squared norm) instead of through DTensor dispatch, which costs host time
  per operator and parameter (~290 parameters at 0.5B). The optimizer itself is
  torch's fused AdamW on CUDA (``actor.fused_optimizer``, set in atropos_verl.policy.actor).

The padded-rows step also hands the loss what atropos_verl.regularizers reads from
the logits (entropy, the student's logits at a teacher's top-k ids), at trained
positions only. Other layouts and outputs (packed rows, fused kernels, verl's own
entropy and distillation options, multi-modal inputs) go through verl's own step, and other gradient layouts
(HSDP, scaler, QAT) through verl's optimizer step.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.distributed.tensor import DTensor
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.utils.device import get_device_id, get_device_name
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import detach_tree, postprocess_batch_func, prepare_micro_batches

from atropos_verl.policy.lora import set_dropout
from atropos_verl.policy.reference import with_reference_log_probs
from atropos_verl.policy.rows import cuts_by_offsets, select_rows
from atropos_verl.regularizers import logit_inputs, logit_outputs

# Micro-batch options whose outputs only verl's own step produces (all off by default).
_VERL_STEP_OPTIONS = (
    "use_fused_kernels",
    "calculate_entropy",
    "calculate_sum_pi_squared",
    "distillation_use_topk",
    "distillation_only",
)


def use_policy_engine() -> None:
    """Have verl's ``EngineRegistry`` build :class:`PolicyEngine` for language models in this process.

    ``TrainingWorker`` looks its engine up by device name; the entry for this
    process' device is replaced (verl's ``register`` refuses a second class for a key).
    """
    backends = EngineRegistry._engines.setdefault("language_model", {})
    for backend in ("fsdp", "fsdp2"):
        backends.setdefault(backend, {})[get_device_name()] = PolicyEngine


def uses_padded_rows_step(micro_batch: TensorDict) -> bool:
    """True when the micro-batch asks for padded rows and nothing but log-probs from the model."""
    if tu.get_non_tensor_data(micro_batch, "use_remove_padding", True):
        return False
    if tu.get_non_tensor_data(micro_batch, "pad_mode", DatasetPadMode.NO_PADDING) != DatasetPadMode.NO_PADDING:
        return False
    if any(tu.get_non_tensor_data(micro_batch, key, False) for key in _VERL_STEP_OPTIONS):
        return False
    return "multi_modal_inputs" not in micro_batch.keys() and micro_batch["position_ids"].dim() == 2


def cuts_micro_batches_by_rows(data: TensorDict) -> bool:
    """True when each of verl's micro-batches of ``data`` is a set of whole rows (see atropos_verl.policy.rows)."""
    return (
        tu.get_non_tensor_data(data, "force_group_size", 1) == 1
        and tu.get_non_tensor_data(data, "pad_mode", DatasetPadMode.NO_PADDING) == DatasetPadMode.NO_PADDING
        and cuts_by_offsets(data)
    )


class PaddedRows:
    """Where the packed tokens of a jagged micro-batch sit in padded ``(rows, width)`` rows (host side)."""

    def __init__(self, offsets: torch.Tensor):
        lengths = offsets.diff()
        self.rows, self.width = lengths.numel(), int(lengths.max())
        self.real = torch.arange(self.width) < lengths.unsqueeze(1)
        self.full = bool(self.real.all())
        # Flat index of each packed token in the padded rows.
        self.slots = self.real.flatten().nonzero().squeeze(1)

    def pad(self, packed: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """Packed ``(tokens,)`` values → ``(rows, width)``, ``fill`` after each row's end."""
        if self.full:
            return packed.reshape(self.rows, self.width)
        padded = packed.new_full((self.rows * self.width,), fill)
        padded[self.slots] = packed
        return padded.view(self.rows, self.width)


def padded_model_inputs(micro_batch: TensorDict, rows: PaddedRows) -> dict[str, torch.Tensor]:
    """``input_ids`` (and, where needed, ``attention_mask`` and ``position_ids``) as padded host rows.

    Same inputs as verl's padded path. When no row is padded and positions count
    from 0, the mask and positions are left out: the model assumes exactly those,
    and without a mask Hugging Face need not read it back from the device
    to see that it is all ones.
    """
    pad_token_id = tu.get_non_tensor_data(micro_batch, "pad_token_id", 0)
    input_ids = rows.pad(micro_batch["input_ids"].values(), pad_token_id)
    position_ids = rows.pad(micro_batch["position_ids"].values())
    if rows.full and torch.equal(position_ids, torch.arange(rows.width).expand(rows.rows, rows.width)):
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "attention_mask": rows.real.to(torch.int32), "position_ids": position_ids}


def packed_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """The label of each packed slot, as verl rolls them: token t+1, and the next row's first token
    at a row's last slot (whose loss weight is 0)."""
    return torch.roll(input_ids.values(), shifts=-1, dims=0)


def _device() -> torch.device:
    name = get_device_name()
    return torch.device(name) if name == "cpu" else torch.device(name, get_device_id())


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return tensor
    # From pinned memory the copy is queued on the stream; from pageable memory it can wait for the GPU.
    return tensor.pin_memory().to(device, non_blocking=True)


def _batch_to_device(micro_batch: TensorDict, device: torch.device) -> TensorDict:
    """The micro-batch with every tensor (jagged ones as values + offsets) copied to ``device``."""
    moved = micro_batch.copy()
    for key in micro_batch.keys():
        value = micro_batch.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_nested:
            moved[key] = torch.nested.nested_tensor_from_jagged(
                _to_device(value.values(), device), _to_device(value.offsets(), device)
            )
        else:
            moved[key] = _to_device(value, device)
    return moved


def read_back(output: dict) -> dict:
    """Losses and tensor metrics of a mini-batch's micro-batches → Python numbers, in one device-to-host copy.

    A metric the loss function returns as a tensor is its micro-batch's share of
    a mini-batch total, summed over micro-batches (``AggregationType.SUM``), as
    :func:`atropos_verl.loss.verl_policy_loss` documents, except a ``*_max`` one, which is
    a maximum (``AggregationType.MAX``); other metrics pass through.
    """
    losses, metrics = output["loss"], output["metrics"]
    deferred = [
        key
        for key, values in metrics.items()
        if isinstance(values, list) and values and all(isinstance(v, torch.Tensor) for v in values)
    ]
    pending = [v for v in losses if isinstance(v, torch.Tensor)] + [v for key in deferred for v in metrics[key]]
    if not pending:
        return output
    host = iter(torch.stack([v.detach().float().reshape(()) for v in pending]).tolist())
    output["loss"] = [next(host) if isinstance(v, torch.Tensor) else v for v in losses]
    for key in deferred:
        metric = Metric(AggregationType.MAX if key.endswith("_max") else AggregationType.SUM)
        metric.extend([next(host) for _ in metrics[key]])
        metrics[key] = metric
    return output


@torch.no_grad()
def clip_sharded_grad_norm_(parameters, max_norm: float) -> torch.Tensor | None:
    """Clip FSDP2-sharded gradients to a total 2-norm of ``max_norm``; returns the norm before clipping.

    Works on the local shards: each rank's sum of squares, summed over the mesh,
    is the square of the full norm, exactly what DTensor's reduction computes.
    Returns None, touching nothing, unless every gradient is sharded over one
    and the same 1-D mesh (FSDP2's layout; HSDP and others replicate).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not all(isinstance(g, DTensor) for g in grads):
        return None
    mesh = grads[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh or not g.placements[0].is_shard() for g in grads):
        return None
    shards = [g.to_local() for g in grads]
    squared = torch.nn.utils.get_total_norm(shards, norm_type=2.0, foreach=True).float().square()
    if mesh.size() > 1:
        dist.all_reduce(squared, group=mesh.get_group())
    total_norm = squared.sqrt()
    # torch's rule (clip_grads_with_norm_, which takes parameters rather than gradients).
    torch._foreach_mul_(shards, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    return total_norm


class PolicyEngine(FSDPEngineWithLMHead):
    """verl's FSDP engine for language models with the host-side savings described in the module docstring."""

    # A frozen reference model (atropos_verl.policy.reference), set by PolicyWorker.load_reference.
    reference = None

    def _build_lora_module(self, module):
        # PEFT draws every lora_A at random (on the host: the module is not on the device yet) and
        # verl seeds only under full_determinism. Seeded by actor.seed, two runs of one config start
        # from the same adapter; the process's own random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.engine_config.seed)
            module = super()._build_lora_module(module)
        # verl passes PEFT no dropout; verl_config carries it in the model config's lora dict.
        set_dropout(module, float(self.model_config.lora.get("dropout", 0.0)))
        return module

    def forward_backward_batch(self, data: TensorDict, loss_function, forward_only=False):
        if not cuts_micro_batches_by_rows(data):
            return read_back(super().forward_backward_batch(data, loss_function, forward_only))
        return read_back(self._forward_backward_by_rows(data, loss_function, forward_only))

    def _forward_backward_by_rows(self, data: TensorDict, loss_function, forward_only: bool) -> dict:
        """verl's micro-batch loop, each micro-batch taken from ``data`` (policy.rows) just before its forward.

        verl builds every micro-batch up front, re-nesting every row, and reads the
        token count back from the device, all before the first forward; here the
        GPU gets work after one micro-batch is taken, and the others are taken
        while it computes.
        """
        tu.assign_non_tensor(
            data,
            sp_size=self.ulysses_sequence_parallel_size,
            dp_size=self.get_data_parallel_size(),
            batch_num_tokens=self._batch_num_tokens(data),
        )
        partition = self._micro_batch_rows(data)
        return_model_output = tu.get_non_tensor_data(data, "return_model_output", False)
        scaler = getattr(self, "scaler", None)
        outputs = []
        for index, rows in enumerate(partition):
            micro_batch = select_rows(data, rows)
            last = index == len(partition) - 1
            with (
                torch.no_grad() if forward_only else nullcontext(),
                nullcontext() if forward_only else self._gradient_sync_context(is_last_micro_batch=last),
                torch.profiler.record_function(f"micro_batch{index}"),
            ):
                loss, output = self.forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
                if not forward_only:
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    if not return_model_output:
                        output.pop("model_output", None)
            outputs.append(output)
        dynamic = tu.get_non_tensor_data(data, "use_dynamic_bsz", True)
        return postprocess_batch_func(output_lst=outputs, indices=partition if dynamic else None, data=data)

    def _micro_batch_rows(self, data: TensorDict) -> list[list[int]]:
        """The rows of each micro-batch, in the order verl would run them."""
        rows = data.batch_size[0]
        if tu.get_non_tensor_data(data, "use_dynamic_bsz", True):
            # verl's balanced partition under the token budget (agreed across data-parallel
            # ranks), computed on the sequence lengths alone: it copies what it is given.
            lengths = TensorDict({"input_ids": data["input_ids"]}, batch_size=data.batch_size)
            tu.assign_non_tensor(
                lengths,
                use_dynamic_bsz=True,
                sp_size=self.ulysses_sequence_parallel_size,
                max_token_len_per_gpu=tu.get_non_tensor_data(data, "max_token_len_per_gpu", None),
            )
            _, partition = prepare_micro_batches(
                lengths, dp_group=self.get_data_parallel_group(), same_micro_num_in_dp=True
            )
            return [list(part) for part in partition]
        size = tu.get_non_tensor_data(data, "micro_batch_size_per_gpu", None)
        if rows % size:
            raise ValueError(f"{rows} sequences per rank do not split into micro-batches of {size}")
        return [list(range(start, start + size)) for start in range(0, rows, size)]

    def _batch_num_tokens(self, data: TensorDict) -> float:
        """Loss-mask total of the mini-batch over all data-parallel ranks (the loss normaliser)."""
        local = data["loss_mask"].values().sum()
        if self.get_data_parallel_size() == 1:
            return local.item()
        total = local.to(_device())
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.get_data_parallel_group())
        return total.item()

    def optimizer_step(self):
        # A loss scaler or QAT needs verl's step around the clip; so do gradients that are not FSDP2 shards.
        if getattr(self, "scaler", None) is not None or self._qat_enabled:
            return super().optimizer_step()
        grad_norm = clip_sharded_grad_norm_(self.module.parameters(), self.optimizer_config.clip_grad)
        if grad_norm is None:
            return super().optimizer_step()
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            # verl's rule: a non-finite gradient skips the update.
            print(f"WARN: grad_norm is not finite: {grad_norm}")
            self.optimizer.zero_grad()
        return grad_norm.item()

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        if not uses_padded_rows_step(micro_batch):
            return super().forward_step(micro_batch, loss_function, forward_only)
        device = _device()
        input_ids = micro_batch["input_ids"]
        rows = PaddedRows(input_ids.offsets())
        model_inputs = {key: _to_device(value, device) for key, value in padded_model_inputs(micro_batch, rows).items()}
        labels = _to_device(rows.pad(packed_labels(input_ids)), device)
        slots = None if rows.full else _to_device(rows.slots, device)
        temperature = micro_batch["temperature"]
        unit_temperature = transformer_impl._is_scalar_unit_temperature(temperature)
        if not unit_temperature:
            if not isinstance(temperature, torch.Tensor):
                temperature = torch.full((rows.rows,), float(temperature))
            temperature = _to_device(temperature.to(torch.float32), device).view(rows.rows, 1, 1)
        data = _batch_to_device(micro_batch, device)
        extra_inputs = logit_inputs(micro_batch, rows.slots if not rows.full else None)
        if extra_inputs is not None:
            extra_inputs = extra_inputs.to(device)

        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (
            nullcontext()
            if autocast_dtype == torch.float32
            else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype)
        )
        with autocast:
            logits = self.module(**model_inputs, use_cache=False).logits
            logits = transformer_impl._scale_logits_by_temperature(
                logits, temperature, is_unit_temperature=unit_temperature
            )
            # Looked up on verl's module so that atropos_verl.policy.logprobs.install() applies.
            # The entropy's backward reads the logits: their storage must not take the log-probs' gradient.
            inplace = extra_inputs is None or not extra_inputs.entropy
            log_probs = transformer_impl.logprobs_from_logits(
                logits=logits, labels=labels, inplace_backward=inplace
            ).flatten()
            if slots is not None:
                log_probs = log_probs.index_select(0, slots)
            model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, data["input_ids"].offsets())}
            if extra_inputs is not None:
                model_output.update(logit_outputs(logits, extra_inputs, log_probs.numel()))
            if self.reference is not None and "ref_log_probs" in data.keys():
                with torch.no_grad():
                    ref_logits = self.reference(**model_inputs, use_cache=False).logits
                    ref_logits = transformer_impl._scale_logits_by_temperature(
                        ref_logits, temperature, is_unit_temperature=unit_temperature
                    )
                    ref_log_probs = transformer_impl.logprobs_from_logits(logits=ref_logits, labels=labels).flatten()
                    if slots is not None:
                        ref_log_probs = ref_log_probs.index_select(0, slots)
                data = with_reference_log_probs(data, ref_log_probs)
            if loss_function is not None:
                loss, metrics = loss_function(
                    model_output=model_output, data=data, dp_group=self.get_data_parallel_group()
                )
            else:
                assert forward_only, "forward_only must be True when loss_function is None"
                loss, metrics = torch.ones((), device=device), {}
        # The loss stays on the device: read_back() fetches all of them once backward is launched.
        return loss, {"model_output": detach_tree(model_output), "loss": loss.detach(), "metrics": metrics}
