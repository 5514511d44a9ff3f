"""A child process the run owns: its own session, a log file, a readiness probe, and a stop by PID.

Every process the project starts (the Atropos API, environments, inference servers,
and the tests' own servers) goes through :class:`ChildProcess`, so there is one
answer to "how is it stopped": SIGTERM to its process group, SIGKILL after a grace
period, then SIGKILL to whatever of the group is left (engine cores, workers).
Nothing is ever stopped by name.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from atropos_verl.netutil import log_tail

_POLL_S = 0.05
_PROBE_INTERVAL_S = 0.25


class ChildFailed(RuntimeError):
    """A child exited or never became ready; the message names it and shows its last log lines."""


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``GET url`` answers 200 within ``timeout_s`` (any network error is False)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path or "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class ChildProcess:
    """One started command. ``label`` names it in every message; ``redact`` hides secrets in the log header."""

    def __init__(self, label: str, log_path: Path, tail_lines: int = 40) -> None:
        self.label = label
        self.log_path = Path(log_path)
        self.tail_lines = tail_lines
        self._proc: subprocess.Popen[bytes] | None = None
        # Set once stop() has reaped the child: its group id may then belong to a stranger.
        self._reaped = False
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"{self.label} (pid {self.pid})" if self.pid is not None else self.label

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self.exit_status() is None

    def start(
        self,
        cmd: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        shown: Sequence[str] | None = None,
    ) -> None:
        """Launch ``cmd`` in a new session, output appended to the log; ``shown`` is what the log says ran."""
        if self.running:
            raise ChildFailed(f"{self}: already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody reads the output while the child runs, and a full
        # pipe would block its logging.
        self._log = self.log_path.open("ab")
        self._log.write(f"=== {self.label}: {' '.join(shown if shown is not None else cmd)}\n".encode())
        self._log.flush()
        self._reaped = False
        try:
            # A new session makes the child the leader of a process group holding its own
            # helpers too, so stopping the group stops all of them and nothing else.
            self._proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise ChildFailed(f"{self.label}: cannot launch {cmd[0]}: {exc}") from exc

    def _exit(self) -> tuple[int, str] | None:
        """(returncode, description) once the child exited, else None; never reaps it.

        WNOWAIT leaves an exited child unreaped: its zombie keeps the process group id
        reserved, so :meth:`stop` can still signal that group without reaching strangers.
        """
        assert self._proc is not None
        if self._reaped:
            code = self._proc.wait()
        else:
            try:
                result = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                # Reaped by someone else: the group id is no longer ours to signal.
                self._reaped = True
                return self._exit()
            if result is None:
                return None
            code = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        if code >= 0:
            return code, f"exited with status {code}"
        return code, f"killed by signal {signal.Signals(-code).name}"

    def exit_status(self) -> str | None:
        """How the child exited, or None while it runs."""
        if self._proc is None:
            return "not started"
        exited = self._exit()
        return None if exited is None else exited[1]

    def returncode(self) -> int | None:
        """The exit code once exited (negative: killed by that signal), else None."""
        exited = self._exit() if self._proc is not None else None
        return None if exited is None else exited[0]

    def tail(self, lines: int | None = None) -> str:
        return f"last lines of {self.log_path}:\n{log_tail(self.log_path, lines or self.tail_lines)}"

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float, what: str = "readiness probe") -> None:
        """Block until ``ready()`` is true; raise (after stopping the child) if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                ok = ready()
                status = self.exit_status()
                if status is not None:
                    raise ChildFailed(f"{self}: {status} during start-up; {self.tail()}")
                if ok:
                    return
                if time.monotonic() >= deadline:
                    raise ChildFailed(f"{self}: {what} not passed within {timeout_s:g}s; {self.tail()}")
                time.sleep(_PROBE_INTERVAL_S)
        except BaseException:
            self.stop()
            raise

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child's whole process group (no-op once the group is gone)."""
        if self._proc is not None and not self._reaped:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL after ``timeout_s``, then SIGKILL what is left of it; idempotent."""
        proc = self._proc
        if proc is None or self._reaped:
            self._close_log()
            return
        if self.exit_status() is None:
            self.signal(signal.SIGTERM)
            if not self._wait(lambda: self.exit_status() is not None, timeout_s):
                self.signal(signal.SIGKILL)
                if not self._wait(lambda: self.exit_status() is not None, timeout_s):
                    raise ChildFailed(f"{self}: survived SIGKILL for {timeout_s:g}s")
        # Helpers the child spawned share its group and may hold its sockets.
        self.signal(signal.SIGKILL)
        proc.wait(timeout=timeout_s)
        self._reaped = True
        # Killed helpers linger (as zombies of init) until reaped; while any does, the
        # group id stays reserved, so probing it cannot reach another process.
        if not self._wait(lambda: not _group_alive(proc.pid), timeout_s):
            raise ChildFailed(f"{self}: process group {proc.pid} still has members {timeout_s:g}s after it exited")
        self._close_log()

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
