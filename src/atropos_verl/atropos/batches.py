"""The trainer's source of batches: spooled batches a crash left untrained first, then the API's.

Every batch fetched from ``GET /batch`` is written to the spool before it is handed
out (the API keeps no copy), marked with the step that trained it, and forgotten
once a checkpoint covers that step. API outages and restarts are ridden out for up
to ``atropos.batch_timeout``; an environment failure ends the wait at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from typing import Any, Optional

from atropos_verl.atropos.client import AtroposAPIError, AtroposClient
from atropos_verl.atropos.environments import EnvironmentFailedError, EnvSupervisor
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
    ):
        self.client = client
        self.spool = spool
        self.envs = envs
        self.batch_timeout_s = batch_timeout_s
        self.retry_pause_s = min(retry_pause_s, _RETRY_PAUSE_S)
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

    async def _fetch(self) -> list[dict[str, Any]]:
        give_up_at = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        while True:
            remaining = None if give_up_at is None else max(give_up_at - time.monotonic(), 0.0)
            try:
                raw_groups = await self.client.next_batch(deadline_s=remaining, stop=self.envs.failed)
            except AtroposAPIError as error:
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    raise
                logger.warning("%s; retrying until atropos.batch_timeout", error)
                await asyncio.sleep(self.retry_pause_s)
                continue
            if raw_groups is None:
                raise EnvironmentFailedError(self.envs.failure or "an environment failed")
            return raw_groups
