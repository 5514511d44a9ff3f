"""Stopping a run on SIGTERM, SIGINT or SIGHUP: cancel the main task, unwind, exit with 128 + signal number.

The signal only cancels the run's main task; the trainer's exit stack then stops
everything the run started (environments, API, engines, Ray), and ``train.py``
exits with the conventional status once that is done. Ray's driver replaces the
process's SIGTERM handler when it connects (its crash handler prints a stack), so
the trainer installs the handlers again after Ray has started.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_T = TypeVar("_T")


class StopSignals:
    """Remembers the first stop signal and cancels the task that called :meth:`install`."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + self.received

    def install(self) -> None:
        """Install the handlers for the current task (the one a signal cancels); call from that task."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        assert self._task is not None, "install() must be called from the task to cancel"
        self._add_handlers()

    def reinstall(self) -> None:
        """Install the handlers again, from any thread (signal handlers can only be set on the loop's)."""
        assert self._loop is not None, "install() first"
        self._loop.call_soon_threadsafe(self._add_handlers)

    def _add_handlers(self) -> None:
        assert self._loop is not None
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is not None:
            # A second cancellation would interrupt the teardown the first one started,
            # leaving children running; the teardown is bounded by its own timeouts.
            logger.warning("received %s while stopping; still stopping what the run started", sig.name)
            return
        self.received = sig
        logger.warning("received %s: stopping everything the run started", sig.name)
        assert self._task is not None
        self._task.cancel()


async def finish_in_thread(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)`` in a thread; a cancellation waits for it to return before propagating.

    A thread cannot be interrupted: cancelling ``asyncio.to_thread`` would let the
    teardown (stopping Ray's workers) race the call still using them.
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
