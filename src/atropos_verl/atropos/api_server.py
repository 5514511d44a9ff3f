"""Run atroposlib's trajectory API server (`run-api`) as a child process.

Used by tests and by launchers that want a private API next to the trainer. The
server keeps all state in memory, so one process per run keeps runs isolated.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from atropos_verl.netutil import bind_probe, connect_host, free_port, http_url, log_tail

_LOG_TAIL_LINES = 30
_PROBE_INTERVAL_S = 0.1


class ApiServerStartError(RuntimeError):
    """The API server exited or never answered GET /status during start-up."""


@dataclass
class ApiServerProcess:
    """A running `run-api` child process; stop it with `stop()` or a `with` block."""

    host: str
    port: int
    log_path: Path
    _proc: subprocess.Popen[bytes] = field(repr=False)
    _log_file: IO[bytes] = field(repr=False)
    _owns_log: bool = field(repr=False)

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
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody reads the server's output while it runs, and a
        # full pipe would block its logging and so every request.
        log_file = path.open("ab")
        cmd = [sys.executable, "-m", "atroposlib.cli.run_api", "--host", host, "--port", str(port)]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError:
            log_file.close()
            raise
        server = cls(host=host, port=port, log_path=path, _proc=proc, _log_file=log_file, _owns_log=owns_log)
        try:
            server._wait_ready(ready_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running, else the exit status."""
        return self._proc.poll()

    def _answers_status(self) -> bool:
        conn = http.client.HTTPConnection(connect_host(self.host), self.port, timeout=1.0)
        try:
            conn.request("GET", "/status")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _wait_ready(self, ready_timeout_s: float) -> None:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            answered = self._answers_status()
            code = self._proc.poll()
            if code is not None:
                raise ApiServerStartError(
                    f"Atropos API server (pid {self.pid}, {self.url}) exited with status {code} "
                    f"during start-up; last lines of {self.log_path}:\n{log_tail(self.log_path, _LOG_TAIL_LINES)}"
                )
            if answered:
                return
            if time.monotonic() >= deadline:
                raise ApiServerStartError(
                    f"Atropos API server (pid {self.pid}) did not answer GET {self.url}/status within "
                    f"{ready_timeout_s}s; last lines of {self.log_path}:\n{log_tail(self.log_path, _LOG_TAIL_LINES)}"
                )
            time.sleep(_PROBE_INTERVAL_S)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop this process (by PID only): SIGTERM, wait, then SIGKILL. Safe to call twice."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout_s)
        if not self._log_file.closed:
            self._log_file.close()
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
