"""Checkpoints of a run: ``<run_dir>/checkpoints/global_step_N/{actor/, trainer_state.json}`` and a latest pointer.

The actor's weights and optimizer are verl's checkpoint (``actor/``); the loop's own
counters are one :class:`Progress` record saved whole beside it. The pointer moves
only after both are on disk (fsynced), so a crash mid-save leaves the previous
checkpoint the valid one; the spool forgets batches only after that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LATEST_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".trainer.lock"


class RunDirInUse(RuntimeError):
    """Another trainer holds the run directory: two would replay and train the same spooled batches."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the trainer's lifetime (released if the process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirInUse(
                f"{run_dir} is in use by trainer pid {holder}; give this run its own trainer.run_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Progress:
    """Where the loop stands: the step trained last and what has been trained and rejected so far."""

    step: int = 0
    groups_trained_total: int = 0
    groups_rejected_total: int = 0
    # Dropped by trainer.max_staleness (trained neither now nor later).
    groups_stale_total: int = 0


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and then each folder, so renames and new entries are durable."""
    folders = [root]
    for path in root.rglob("*"):
        if path.is_file():
            _fsync_path(path)
        elif path.is_dir():
            folders.append(path)
    for folder in reversed(folders):
        _fsync_path(folder)


class CheckpointDir:
    def __init__(self, root: Path, keep: Optional[int]):
        self.root = root
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"global_step_{step}"

    def actor_dir(self, step: int) -> Path:
        return self.step_dir(step) / "actor"

    def latest_step(self) -> Optional[int]:
        pointer = self.root / LATEST_FILE
        if not pointer.exists():
            return None
        return int(pointer.read_text().strip())

    def load_progress(self, step: int) -> Progress:
        return Progress(**json.loads((self.step_dir(step) / STATE_FILE).read_text()))

    def commit(self, progress: Progress) -> None:
        """Write the progress record, flush the checkpoint to disk, then move the latest pointer."""
        step_dir = self.step_dir(progress.step)
        (step_dir / STATE_FILE).write_text(json.dumps(dataclasses.asdict(progress), indent=2))
        _fsync_tree(step_dir)
        tmp = self.root / f".{LATEST_FILE}.tmp"
        tmp.write_text(str(progress.step))
        _fsync_path(tmp)
        tmp.replace(self.root / LATEST_FILE)
        _fsync_path(self.root)
        if self.keep:
            steps = sorted(int(p.name.split("_")[-1]) for p in self.root.glob("global_step_*"))
            for old in steps[: -self.keep]:
                shutil.rmtree(self.step_dir(old), ignore_errors=True)


def find_checkpoint(path: Path) -> tuple[CheckpointDir, int]:
    """The checkpoint ``path`` names: a ``global_step_N`` folder, or a checkpoints or run folder (its latest).

    Raises ValueError saying what was looked for when ``path`` holds none.
    """
    path = path.expanduser().resolve()
    if (path / STATE_FILE).is_file() and path.name.startswith("global_step_"):
        return CheckpointDir(path.parent, None), int(path.name.removeprefix("global_step_"))
    for root in (path, path / "checkpoints"):
        latest = CheckpointDir(root, None).latest_step() if (root / LATEST_FILE).is_file() else None
        if latest is not None:
            return CheckpointDir(root, None), latest
    raise ValueError(
        f"{path} is not a checkpoint: expected a global_step_N folder with {STATE_FILE}, or a checkpoints "
        f"(or run) folder with {LATEST_FILE}"
    )
