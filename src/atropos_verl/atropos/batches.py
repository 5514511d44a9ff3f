"""The trainer's source of batches: spooled batches a crash left untrained first, then the API's.

Every batch fetched from ``GET /batch`` is written to the spool before it is handed
out (the API keeps no copy), marked with the step that trained it, and forgotten
once a checkpoint covers that step. API outages and restarts are ridden out for up
to ``atropos.batch_timeout``; an environment failure, or the exit of the API the run
itself started (nothing restarts it), ends the wait at once. While it waits, a
:class:`StarvationReporter` logs why no batch forms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from atropos_verl.atropos.api_server import ApiServerProcess
from atropos_verl.atropos.client import AtroposAPIError, AtroposClient
from atropos_verl.atropos.environments import EnvironmentFailedError, EnvSupervisor
from atropos_verl.atropos.starvation import StarvationReporter
from atropos_verl.spool import GroupSpool

logger = logging.getLogger(__name__)

# Longest pause between two tries after the API failed.
_RETRY_PAUSE_S = 5.0


class BatchSource:
    def __init__(
        self,
        client: AtroposClient,
        spool: GroupSpool,
        replay: list[tuple[int, list[dict[str, Any]]]],
        envs: EnvSupervisor,
        batch_timeout_s: Optional[float],
        retry_pause_s: float,
        api: Optional[ApiServerProcess] = None,
        env_log_dir: Optional[Path] = None,
        starvation_hint_after_s: float = 300.0,
    ):
        """``api`` is the API process this run started, if it did; ``env_log_dir`` holds the environments' logs."""
        self.client = client
        self.spool = spool
        self.envs = envs
        self.batch_timeout_s = batch_timeout_s
        self.retry_pause_s = min(retry_pause_s, _RETRY_PAUSE_S)
        self.api = api
        self.env_log_dir = env_log_dir
        self.starvation_hint_after_s = starvation_hint_after_s
        self._replay = deque(replay)

    async def next(self) -> tuple[int, list[dict[str, Any]]]:
        """The next batch to train on, as (spool id, raw groups)."""
        if self._replay:
            return self._replay.popleft()
        raw_groups = await self._fetch()
        return self.spool.record(raw_groups), raw_groups

    def done(self, batch_id: int, step: int) -> None:
        """The batch was consumed by ``step`` (trained, or wholly rejected before it)."""
        self.spool.mark_trained(batch_id, step)
        # A re-registration after an API restart must resume the API's step count here.
        self.client.registration = dataclasses.replace(self.client.registration, starting_step=step)

    def checkpoint_committed(self, step: int) -> None:
        self.spool.checkpoint_committed(step)

    def _env_processes(self) -> tuple[int, int]:
        """(environment processes the run supervises, how many of them run now)."""
        return len(self.envs.processes), sum(p.child.running for p in self.envs.processes)

    async def _fetch(self) -> list[dict[str, Any]]:
        reporter = StarvationReporter(self.client, self._env_processes, self.env_log_dir, self.starvation_hint_after_s)
        reporting = asyncio.create_task(reporter.run())
        try:
            return await self._poll()
        finally:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)

    async def _poll(self) -> list[dict[str, Any]]:
        give_up_at = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        while True:
            remaining = None if give_up_at is None else max(give_up_at - time.monotonic(), 0.0)
            try:
                raw_groups = await self.client.next_batch(deadline_s=remaining, stop=self.envs.failed)
            except AtroposAPIError as error:
                ended = self.api.exit_report() if self.api is not None else None
                if ended is not None:
                    raise AtroposAPIError(error.url, f"the API this run started is gone: {ended}") from error
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    raise
                logger.warning("%s; retrying until atropos.batch_timeout", error)
                await asyncio.sleep(self.retry_pause_s)
                continue
            if raw_groups is None:
                raise EnvironmentFailedError(self.envs.failure or "an environment failed")
            return raw_groups
