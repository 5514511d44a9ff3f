"""Chunks of a ``(rows, vocab)`` block of logits, for the functions that bound their memory by them.

:func:`atropos_verl.policy.logprobs.token_logprobs` and
:func:`atropos_verl.regularizers.token_entropy` both take the logits a chunk of rows at a
time, so the float32 copy they make is one chunk whatever the batch size.
"""

from __future__ import annotations

# Rows per chunk are chosen so one float32 chunk of logits stays near this size.
CHUNK_BYTES = 1 << 30


def rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    """Rows of ``vocab`` float32 logits that fit ``chunk_bytes`` (at least one)."""
    return max(1, chunk_bytes // (4 * vocab))
