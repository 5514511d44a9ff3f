"""Stop signals cancel the run's task once and remember the signal; blocking calls finish before unwinding."""

import asyncio
import os
import signal
import threading
import time

import pytest

from atropos_verl.stopping import StopSignals, finish_in_thread


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_cancels_the_task_once_and_sets_the_exit_code(sig):
    stops = StopSignals()
    unwound = []

    async def run():
        stops.install()
        try:
            os.kill(os.getpid(), sig)
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            # A second signal during the teardown must not interrupt it.
            os.kill(os.getpid(), sig)
            await asyncio.sleep(0.2)
            unwound.append(True)
            raise

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
    assert unwound == [True]
    assert stops.received == sig
    assert stops.exit_code == 128 + sig


@pytest.mark.timeout(30)
def test_reinstall_from_a_thread_restores_handlers_replaced_behind_the_loop():
    stops = StopSignals()

    async def run():
        stops.install()
        # Ray's driver replaces the handler when it connects; a harmless stand-in here.
        signal.signal(signal.SIGTERM, lambda *_: None)
        await asyncio.to_thread(stops.reinstall)
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(10)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
    assert stops.received == signal.SIGTERM


@pytest.mark.timeout(30)
def test_finish_in_thread_waits_for_the_call_before_the_cancellation_propagates():
    started, finished = threading.Event(), []

    def blocking():
        started.set()
        time.sleep(0.5)
        finished.append(time.monotonic())

    async def run():
        task = asyncio.create_task(finish_in_thread(blocking))
        await asyncio.to_thread(started.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    cancelled_at = asyncio.run(run())
    assert finished and finished[0] <= cancelled_at
