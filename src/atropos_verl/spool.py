"""A durable spool of the batches fetched from the Atropos API: nothing fetched is lost.

``/batch`` hands a batch out once and keeps no copy, so the trainer writes every
batch to SQLite (WAL, synchronous commits) before it trains on it, records the
step that trained it, and forgets it only once a checkpoint covers that step.
After a crash, ``trainer.resume=auto`` restarts from the latest checkpoint and
first replays, in fetch order, every batch that checkpoint does not include:
nothing is dropped and nothing is trained twice in the model's lineage.

A ``history`` table keeps one row per (batch, step, attempt) for audits such as
the fault suite's "lost" and "double-trained" counts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fetched_at REAL NOT NULL,
    groups TEXT NOT NULL,
    num_groups INTEGER NOT NULL,
    trained_step INTEGER
);
CREATE TABLE IF NOT EXISTS history (
    batch_id INTEGER NOT NULL,
    num_groups INTEGER NOT NULL,
    step INTEGER NOT NULL,
    attempt INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    attempt INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    resumed_from_step INTEGER NOT NULL
);
"""


class GroupSpool:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None)
        # Pages freed when a checkpoint lets batches go are returned to the file system
        # (checkpoint_committed), so the spool stays about as big as the batches since the last
        # checkpoint. Takes effect in a new spool only (set before its tables exist).
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch survives a power cut, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.attempt: Optional[int] = None

    def start_attempt(self, resumed_from_step: int) -> list[tuple[int, list[dict[str, Any]]]]:
        """Begin a (re)start from the checkpoint at ``resumed_from_step`` (0: none).

        Returns the batches to replay first, oldest first: those never trained, and
        those trained after that checkpoint (their updates were lost with the crash).
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self.attempt = self._db.execute(
                "INSERT INTO attempts (started_at, resumed_from_step) VALUES (?, ?)", (time.time(), resumed_from_step)
            ).lastrowid
            self._db.execute("UPDATE batches SET trained_step = NULL WHERE trained_step > ?", (resumed_from_step,))
        rows = self._db.execute("SELECT id, groups FROM batches WHERE trained_step IS NULL ORDER BY id").fetchall()
        return [(batch_id, json.loads(groups)) for batch_id, groups in rows]

    def record(self, groups: list[dict[str, Any]]) -> int:
        """Persist a freshly fetched batch before anything trains on it; returns its id."""
        # allow_nan: the API may hand out NaN/inf values; the groups are validated later.
        payload = json.dumps(groups, allow_nan=True)
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO batches (fetched_at, groups, num_groups) VALUES (?, ?, ?)",
                (time.time(), payload, len(groups)),
            )
        return int(cursor.lastrowid)

    def mark_trained(self, batch_id: int, step: int) -> None:
        """``step``: the optimizer step whose update includes the batch (or the step it was skipped at)."""
        with self._db:
            self._db.execute("UPDATE batches SET trained_step = ? WHERE id = ?", (step, batch_id))
            self._db.execute(
                "INSERT INTO history (batch_id, num_groups, step, attempt) "
                "SELECT id, num_groups, ?, ? FROM batches WHERE id = ?",
                (step, self.attempt or 0, batch_id),
            )

    def checkpoint_committed(self, step: int) -> None:
        """A checkpoint now holds every update up to ``step``: those batches need no replay."""
        with self._db:
            self._db.execute("DELETE FROM batches WHERE trained_step IS NOT NULL AND trained_step <= ?", (step,))
        # As a script: Python's execute() steps this pragma once, freeing a single page.
        self._db.executescript("PRAGMA incremental_vacuum;")
        # The write-ahead log holds the deleted batches too until it is checkpointed and truncated.
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def pending(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM batches WHERE trained_step IS NULL").fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Lineage:
    """How often each fetched batch is in the final model's lineage (1 = exactly once)."""

    counts: dict[int, int]
    groups: dict[int, int]

    @property
    def groups_lost(self) -> int:
        return sum(self.groups[b] for b, n in self.counts.items() if n == 0)

    @property
    def groups_double_trained(self) -> int:
        return sum(self.groups[b] * (n - 1) for b, n in self.counts.items() if n > 1)


def lineage(path: Path) -> Lineage:
    """An attempt that resumed from checkpoint step c discards the trainings of earlier
    attempts after step c; the trainings that remain are the lineage. Batches still in
    the spool untrained count as lost."""
    db = sqlite3.connect(str(path))
    try:
        attempts = db.execute("SELECT attempt, resumed_from_step FROM attempts ORDER BY attempt").fetchall()
        history = db.execute("SELECT batch_id, num_groups, step, attempt FROM history ORDER BY attempt").fetchall()
        spooled = db.execute("SELECT id, num_groups FROM batches").fetchall()
    finally:
        db.close()
    groups = {batch_id: n for batch_id, n, _, _ in history}
    groups.update(dict(spooled))
    kept: list[tuple[int, int]] = []
    for attempt, resumed_from in attempts:
        kept = [(b, s) for b, s in kept if s <= resumed_from]
        kept += [(b, s) for b, _, s, a in history if a == attempt]
    counts = {batch_id: 0 for batch_id in groups}
    for batch_id, _ in kept:
        counts[batch_id] += 1
    return Lineage(counts, groups)
