"""The contract of a weight transport: how one policy version gets from the trainer into replicas.

A transport owns its format end to end (what the trainer's workers produce, how a
replica takes it in). :class:`~atropos_verl.serving.sync.WeightSync` drives it: it
calls :meth:`WeightTransport.prepare` while replicas still serve, pauses them, calls
:meth:`WeightTransport.push`, resumes them and proves the result by log-probs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol, Sequence


class WeightReceiver(Protocol):
    """The replica end (an :class:`~atropos_verl.serving.replicas.base.InferenceReplica`)."""

    name: str
    policy_version: int

    async def load_weights(self, weights_dir: str, version: int) -> None: ...


class PolicyWeights(Protocol):
    """The trainer end: what a transport may ask of the policy's workers."""

    def export_weights(self, out_dir: str, bucket_bytes: int, dtype: str) -> dict[str, float]: ...

    def log_probs(self, sequences: list[list[int]]) -> list[list[float]]: ...


@dataclass
class TransferStats:
    bytes: float
    # Trainer-side work before replicas pause (gather, write), and the push while they are paused.
    prepare_seconds: float = 0.0
    push_seconds: float = 0.0


class WeightTransport(abc.ABC):
    """Moves the trainer's current weights into replicas; ``name`` labels it in logs and metrics."""

    name: str

    @abc.abstractmethod
    async def prepare(self, version: int) -> TransferStats:
        """Trainer-side work for ``version`` that needs no replica paused (may be nothing)."""

    @abc.abstractmethod
    async def push(self, version: int, replicas: Sequence[WeightReceiver]) -> None:
        """Load ``version`` into every replica; they are paused and hold no requests in flight."""

    @abc.abstractmethod
    async def restore(self, replica: WeightReceiver) -> None:
        """Give a freshly (re)started replica the last version pushed, if any."""

    def close(self) -> None:
        """Release what the transport holds (folders, buffers, process groups)."""
