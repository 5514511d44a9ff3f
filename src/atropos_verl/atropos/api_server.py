"""Run atroposlib's trajectory API server (`run-api`) as a child process.

Used by the trainer when the run starts its own API, and by tests. The server keeps
all state in memory, so one process per run keeps runs isolated.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from atropos_verl.netutil import bind_probe, free_port, http_url
from atropos_verl.procs import ChildFailed, ChildProcess, http_ok


class ApiServerStartError(RuntimeError):
    """The API server exited or never answered GET /status during start-up."""


def api_answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether an Atropos API answers ``GET /status`` at ``url``."""
    return http_ok(f"{url.rstrip('/')}/status", timeout_s)


class ApiServerProcess:
    """A running `run-api` child process; stop it with `stop()` or a `with` block."""

    def __init__(self, host: str, port: int, child: ChildProcess, owns_log: bool) -> None:
        self.host = host
        self.port = port
        self._child = child
        self._owns_log = owns_log

    def __repr__(self) -> str:
        return f"ApiServerProcess({self.url}, pid {self.pid})"

    @classmethod
    def start(
        cls,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> ApiServerProcess:
        """Launch the server and return once GET /status answers 200.

        Raises ApiServerStartError (with the last log lines) if the process exits
        or is not ready within `ready_timeout_s`; the process is stopped first.
        """
        if port is None:
            port = free_port(host)
        else:
            # Otherwise the readiness probe could be answered by whatever already listens there.
            try:
                bind_probe(host, port)
            except OSError as exc:
                raise ApiServerStartError(f"cannot start the Atropos API on {host}:{port}: {exc}") from exc
        owns_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"atropos-api-{port}-", suffix=".log")
            os.close(fd)
            log_path = name
        child = ChildProcess(f"Atropos API server ({http_url(host, port)})", Path(log_path), tail_lines=30)
        server = cls(host, port, child, owns_log)
        try:
            child.start(
                [sys.executable, "-m", "atroposlib.cli.run_api", "--host", host, "--port", str(port)],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            child.wait_ready(lambda: api_answers(server.url, 1.0), ready_timeout_s, f"GET {server.url}/status")
        except ChildFailed as exc:
            server.stop()
            raise ApiServerStartError(str(exc)) from None
        return server

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    @property
    def returncode(self) -> int | None:
        """None while running, else the exit status."""
        return self._child.returncode()

    def exit_report(self) -> str | None:
        """None while the server runs; else how it exited and its last log lines."""
        status = self._child.exit_status()
        return None if status is None else f"{self._child}: {status}; {self._child.tail()}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop this server's process group (by PID only): SIGTERM, wait, then SIGKILL. Safe to call twice."""
        self._child.stop(timeout_s)
        if self._owns_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ApiServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
