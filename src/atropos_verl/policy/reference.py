"""A frozen reference policy inside the policy engine, for the KL term of sequences sent without ``ref_logprobs``.

``loss.ref_model`` names it (``policy``: the run's starting weights, ``model.path``). Each
rank holds a full, unsharded copy on its device, in float32 like verl's FSDP masters,
run under the same autocast as the policy: memory for one more model, no second worker
group and no extra transfer. Its log-probs are computed in the padded-rows step from the
same padded inputs and temperatures as the policy's, and fill ``ref_log_probs`` where the
environment sent none (the env's own values win). A resumed run reloads the reference
from its path, so it stays the starting point.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from transformers import AutoModelForCausalLM


def load_reference(path: str, device: torch.device, attn_implementation: str, trust_remote_code: bool):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval().requires_grad_(False)


def with_reference_log_probs(data: TensorDict, reference_log_probs: torch.Tensor) -> TensorDict:
    """``data`` with the reference model's packed log-probs where the environment sent none."""
    has_ref = data["has_ref_log_probs"]
    offsets = has_ref.offsets()
    sent = has_ref.values() > 0
    values = torch.where(sent, data["ref_log_probs"].values(), reference_log_probs.to(torch.float32))
    data = data.copy()
    data["ref_log_probs"] = torch.nested.nested_tensor_from_jagged(values, offsets)
    data["has_ref_log_probs"] = torch.nested.nested_tensor_from_jagged(torch.ones_like(values), offsets)
    return data
