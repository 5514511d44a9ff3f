"""Per-token log-probabilities of the labels, fast and memory-bounded, for GPUs without flash-attn.

verl computes the policy's log-probs with flash-attn's fused cross-entropy when it
is installed; otherwise it falls back to a Python loop over rows, which after
padding removal means one ``log_softmax`` launch per token (32k forward and 32k
backward launches for a 32 x 1024-token batch: the update becomes CPU-bound).

:func:`token_logprobs` is the same computation as one autograd function over
chunks of rows: forward keeps only the per-row log-sum-exp (float32), backward
recomputes the softmax chunk by chunk, so the extra memory is one
``chunk x vocab`` float32 block whatever the batch size, and it can write the
gradient into the logits' own storage as flash-attn's kernel does.
:func:`install` points verl's FSDP engine at it when flash-attn is missing.
"""

from __future__ import annotations

import logging

import torch

from atropos_verl.logit_chunks import CHUNK_BYTES, rows_per_chunk

logger = logging.getLogger(__name__)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int, inplace_backward: bool):
        rows = logits.shape[0]
        logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
        log_normalizer = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            chunk = logits[start:end].float()
            lse = torch.logsumexp(chunk, dim=-1)
            log_normalizer[start:end] = lse
            logprobs[start:end] = chunk.gather(-1, labels[start:end].unsqueeze(-1)).squeeze(-1) - lse
        ctx.save_for_backward(logits, labels, log_normalizer)
        ctx.chunk_rows = chunk_rows
        ctx.inplace_backward = inplace_backward
        return logprobs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, labels, log_normalizer = ctx.saved_tensors
        # d logp(y) / d logits = onehot(y) - softmax(logits)
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        grad_output = grad_output.float()
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, logits.shape[0])
            upstream = grad_output[start:end].unsqueeze(-1)
            chunk = torch.exp(logits[start:end].float() - log_normalizer[start:end].unsqueeze(-1))
            chunk.mul_(-upstream)
            chunk.scatter_add_(-1, labels[start:end].unsqueeze(-1), upstream)
            grad[start:end] = chunk.to(grad.dtype)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = False, chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor:
    """``log softmax(logits)[..., label]`` as float32, shape ``labels.shape``.

    ``inplace_backward`` reuses the logits' storage for their gradient: only valid
    when nothing else reads the logits after this function (verl passes False when
    it also computes the entropy).
    """
    shape = labels.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    chunk_rows = rows_per_chunk(flat_logits.shape[-1], chunk_bytes)
    return _TokenLogProbs.apply(flat_logits, flat_labels, chunk_rows, inplace_backward).view(shape)


def _verl_compatible(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    return token_logprobs(logits, labels, inplace_backward=inplace_backward)


def install() -> bool:
    """Use :func:`token_logprobs` in verl's FSDP engine unless flash-attn's fused kernel is available.

    Returns True when installed. verl's engine calls the name imported into its module,
    so that reference is the one replaced; verl's own fast path is kept where it exists.
    """
    from verl.utils import torch_functional
    from verl.workers.engine.fsdp import transformer_impl

    if torch_functional.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE or torch_functional.NPU_CROSS_ENTROPY_LOSS_AVAILABLE:
        return False
    transformer_impl.logprobs_from_logits = _verl_compatible
    logger.info("verl log-probs: chunked fused path (flash-attn cross-entropy not available)")
    return True
