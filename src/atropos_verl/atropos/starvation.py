"""Why no batch forms: what the trainer can see, turned into one line (and, after a while, a fix).

While :class:`~atropos_verl.atropos.batches.BatchSource` waits for ``GET /batch``,
:class:`StarvationReporter` logs a line every :data:`REPORT_EVERY_S` seconds built
by :func:`explain` from an :class:`Observation`: the API's queue (``GET /status``),
the size of the last group it received (``GET /latest_example``; the API exposes no
per-group sizes of its queue), the environment processes the run supervises, and
the groups the environments themselves dropped, counted from the lines atroposlib's
``BaseEnv.handle_send_to_api`` logs into their log files (which also show which of them
registered with the API). Each line leads with the same counts (:meth:`Observation.status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from atropos_verl.atropos.client import AtroposAPIError, AtroposClient

logger = logging.getLogger(__name__)

FIRST_REPORT_AFTER_S = 15.0
REPORT_EVERY_S = 30.0

# The warnings atroposlib 0.4.0's BaseEnv logs when it drops a group instead of sending it.
DROP_LINES = {
    "identical_scores": "Scores are the same in a group, skipping",
    "too_long": "Token length is too long in a group, skipping",
    "wrong_size": "Group structure invalid, or token count mismatch",
}
_DROP_WORDS = {
    "identical_scores": "identical scores",
    "too_long": "too long",
    "wrong_size": "wrong group size",
}


@dataclass(frozen=True)
class Observation:
    waited_s: float
    batch_size: int
    # GET /status; None (and api_error set) when the API did not answer.
    queued_groups: Optional[int]
    # Sequences in the last group the API received; None before any group arrived.
    group_size: Optional[int]
    envs_started: int
    envs_running: int
    # DROP_LINES key -> lines counted in the environments' logs since the wait began.
    dropped: dict[str, int] = field(default_factory=dict)
    api_error: Optional[str] = None
    # Supervised environments registered with the API since their last start (from their logs).
    envs_registered: Optional[int] = None

    def status(self) -> str:
        """The counts behind the reason, the same fields every time."""
        envs = f"environments {self.envs_running}/{self.envs_started} running"
        if self.envs_registered is not None and self.envs_started:
            envs += f", {self.envs_registered} registered"
        queue = "queue unknown" if self.queued_groups is None else f"queue {self.queued_groups} groups"
        size = "no group received yet" if self.group_size is None else f"last group {self.group_size} sequences"
        return f"{envs}; {queue}; {size}; batch {self.batch_size} sequences"


@dataclass(frozen=True)
class Explanation:
    reason: str
    hint: str


def _most_dropped(dropped: dict[str, int]) -> Optional[str]:
    counts = {kind: n for kind, n in dropped.items() if n > 0}
    return max(counts, key=counts.__getitem__) if counts else None


_DROP_HINTS = {
    "identical_scores": (
        "every answer of a group gets the same score, so the environment sends nothing: use easier (or harder) "
        "data, a larger group (--env.group_size), or a stronger model; or add --env.ensure_scores_are_not_same "
        "false to the environment's args, and all-equal groups are then trained with zero advantage (they cost "
        "compute but teach nothing)"
    ),
    "too_long": (
        "sequences reach trainer.max_token_len: raise it (and engine.max_model_len) or lower the environment's "
        "maximum response length"
    ),
    "wrong_size": "the environment returns groups of another size than its group_size: fix its collect_trajectories",
}


def explain(obs: Observation) -> Explanation:
    """The most likely reason no batch of ``obs.batch_size`` sequences forms, and what to change."""
    drops = ", ".join(f"{n} for {_DROP_WORDS[kind]}" for kind, n in obs.dropped.items() if n > 0)
    dropped_clause = f"; the environments' logs show groups dropped since the wait began: {drops}" if drops else ""
    top_drop = _most_dropped(obs.dropped)
    G, B, Q = obs.group_size, obs.batch_size, obs.queued_groups
    if Q is None:
        reason = f"the Atropos API does not answer ({obs.api_error})"
        hint = "check the API's process and log; the trainer retries until atropos.batch_timeout"
    elif obs.envs_started == 0 and G is None:
        reason = "no environment has sent a group: the run starts none (data.envs is empty) and none connected itself"
        hint = "start an environment with --env.rollout_server_url set to atropos.api_url, or pick a data= group"
    elif obs.envs_running < obs.envs_started:
        reason = (
            f"{obs.envs_started - obs.envs_running} of {obs.envs_started} environments are not running "
            "(exited, waiting to restart)"
        )
        hint = "see the environments' logs under the run's envs/ folder for why they exit"
    elif G is not None and B % G != 0:
        reason = f"groups of {G} sequences can never add up to trainer.batch_size={B} ({Q} groups queued)"
        hint = f"make trainer.batch_size a multiple of the environments' group size ({G})"
    elif Q == 0 and top_drop is not None:
        reason = "the API's queue is empty and the environments drop the groups they score"
        hint = _DROP_HINTS[top_drop]
    elif G is None:
        reason = "no environment has sent a scored group yet (loading, generating, or waiting to register)"
        hint = "see the environments' logs under the run's envs/ folder; a slow model or server delays the first group"
    else:
        reason = f"{Q} groups of {G} sequences queued ({Q * G} sequences), a batch needs {B}"
        hint = _DROP_HINTS[top_drop] if top_drop else "environments produce slowly: add replicas or lower batch_size"
    return Explanation(reason + dropped_clause, hint)


# BaseEnv.register_env logs this once the API accepted the environment; ChildProcess writes
# the start header before each (re)start into the same log.
REGISTERED_LINE = "Initialized env with id "
START_HEADER = "=== environment "


class DropCounter:
    """Counts :data:`DROP_LINES` appended to ``log_dir/*.log`` since the counter was made, and which
    environments have registered with the API since their last start (their whole logs)."""

    def __init__(self, log_dir: Optional[Path]):
        self.log_dir = log_dir
        self.registered: dict[Path, bool] = {}
        self._offsets: dict[Path, int] = {}
        for path in self._logs():
            self._read(path)
        self.counts = {kind: 0 for kind in DROP_LINES}

    def _read(self, path: Path) -> str:
        """The complete lines appended since the last read; tracks the registration state on the way."""
        start = self._offsets.get(path, 0)
        with path.open("rb") as f:
            f.seek(start)
            chunk = f.read()
        # A line still being written is read next time, whole.
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offsets[path] = start + len(complete)
        text = complete.decode(errors="replace")
        registered_at, started_at = text.rfind(REGISTERED_LINE), text.rfind(START_HEADER)
        if registered_at >= 0 or started_at >= 0:
            self.registered[path] = registered_at > started_at
        return text

    def registered_count(self) -> int:
        return sum(self.registered.values())

    def _logs(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log")) if self.log_dir is not None and self.log_dir.is_dir() else []

    def update(self) -> dict[str, int]:
        for path in self._logs():
            text = self._read(path)
            for kind, line in DROP_LINES.items():
                self.counts[kind] += text.count(line)
        return dict(self.counts)


class StarvationReporter:
    """Logs why no batch forms, every :data:`REPORT_EVERY_S` s while :meth:`run` runs; cancel it when one does."""

    def __init__(
        self,
        client: AtroposClient,
        env_processes: Callable[[], tuple[int, int]],
        env_log_dir: Optional[Path],
        hint_after_s: float,
        first_after_s: float = FIRST_REPORT_AFTER_S,
        every_s: float = REPORT_EVERY_S,
    ):
        self.client = client
        self.env_processes = env_processes
        self.drops = DropCounter(env_log_dir)
        self.hint_after_s = hint_after_s
        self.first_after_s = first_after_s
        self.every_s = every_s
        self.started_at = time.monotonic()

    async def observe(self) -> Observation:
        queued, group_size, error = None, None, None
        try:
            queued = (await self.client.status()).queue_size
            group_size = len((await self.client.latest_example()).get("tokens") or []) or None
        except AtroposAPIError as exc:
            error = exc.reason
        started, running = self.env_processes()
        return Observation(
            waited_s=time.monotonic() - self.started_at,
            batch_size=self.client.registration.batch_size,
            queued_groups=queued,
            group_size=group_size,
            envs_started=started,
            envs_running=running,
            dropped=await asyncio.to_thread(self.drops.update),
            api_error=error,
            envs_registered=self.drops.registered_count(),
        )

    async def run(self) -> None:
        await asyncio.sleep(self.first_after_s)
        while True:
            obs = await self.observe()
            explanation = explain(obs)
            line = f"no batch for {obs.waited_s:.0f}s ({obs.status()}): {explanation.reason}"
            if obs.waited_s >= self.hint_after_s:
                line += f". Hint: {explanation.hint}"
            logger.warning(line)
            await asyncio.sleep(self.every_s)
