"""Which policy version sampled each trained sequence, without any help from environments.

The gateway records every completion it returns (its token ids, as the environment
received them) with the policy version that served it; the trainer, in the same
process, looks up the completion tokens of each sequence it is about to train on.
A sequence's completion tokens are the positions its ``masks`` mark as trained; a
multi-turn sequence has several runs of them, one per model turn, and is as old as its
oldest turn. A sequence the gateway never served (an external engine, a streamed
completion, a completion the environment re-tokenized differently) has no version: it
is "unknown", and counted as such rather than guessed.

The map is bounded (least recently recorded entries are forgotten first): size it to
hold what environments sample between a completion and its training step, several
batches' worth of sequences.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import numpy as np

IGNORED = -100
# Chat templates close an assistant turn with tokens the sampler never produced
# (an end-of-turn marker, a newline): a run may end with this many extra tokens.
TEMPLATE_SUFFIX_TOKENS = 2


def completion_key(token_ids: Sequence[int]) -> bytes:
    """A fixed-size digest of a completion's token ids (the map holds no token lists)."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def completion_runs(tokens: Sequence[int], masks: Sequence[int]) -> list[list[int]]:
    """The trained token ids of a sequence, one list per contiguous run (one per model turn)."""
    runs: list[list[int]] = []
    current: list[int] = []
    for token, mask in zip(tokens, masks):
        if mask == IGNORED:
            if current:
                runs.append(current)
                current = []
        else:
            current.append(token)
    if current:
        runs.append(current)
    return runs


class PolicyLineage:
    """Bounded map from completion token ids to the policy version that sampled them."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._versions: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._versions)

    def record(self, token_ids: Sequence[int], version: int) -> None:
        """Remember that ``version`` produced ``token_ids``; the same completion sampled again counts as newer."""
        if not token_ids:
            return
        key = completion_key(token_ids)
        self._versions[key] = version
        self._versions.move_to_end(key)
        while len(self._versions) > self.capacity:
            self._versions.popitem(last=False)

    def run_version(self, run: Sequence[int]) -> Optional[int]:
        """The version of one model turn: its exact ids, else the ids without a chat template's closing tokens."""
        for dropped in range(min(TEMPLATE_SUFFIX_TOKENS, len(run) - 1) + 1):
            version = self._versions.get(completion_key(run[: len(run) - dropped]))
            if version is not None:
                return version
        return None

    def sequence_version(self, tokens: Sequence[int], masks: Sequence[int]) -> Optional[int]:
        """The oldest version among the sequence's model turns; None when any turn is unknown."""
        runs = completion_runs(tokens, masks)
        versions = [self.run_version(run) for run in runs]
        if not versions or any(v is None for v in versions):
            return None
        return min(v for v in versions if v is not None)
