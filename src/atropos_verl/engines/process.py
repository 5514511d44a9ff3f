"""One HTTP server process the trainer owns: launch, readiness, control calls, stop by PID.

Shared by the engine adapters (vLLM, SGLang): they decide the command line and the
control routes, this module runs the process and talks to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import aiohttp

from atropos_verl.netutil import free_port, http_url, log_tail, port_is_free
from atropos_verl.engines.base import EngineError, InferenceReplica, ReplicaSpec

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40
_PROBE_INTERVAL_S = 0.25
_EXIT_POLL_S = 0.05
_HEALTH_TIMEOUT_S = 2.0
_ERROR_BODY_CHARS = 2000


class ServerProcess:
    """A server started in its own session (process group), logging to a file, stopped by PID."""

    def __init__(
        self,
        label: str,
        host: str,
        port: int | None,
        log_dir: str | os.PathLike[str] | None,
        log_name: str,
        control_timeout_s: float,
        health_path: str = "/health",
    ) -> None:
        self.label = label
        self.host = host
        self._requested_port = port
        self.port: int | None = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._log_name = log_name
        self._control_timeout_s = control_timeout_s
        self._health_path = health_path
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log_file: IO[bytes] | None = None
        self._owns_log = False
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        where = self.base_url if self.port is not None else "no port yet"
        return f"{self.label} ({where})"

    __str__ = __repr__

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise EngineError(f"{self.label}: no port until start() picks one")
        return http_url(self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def pick_port(self) -> int:
        if self._proc is not None:
            raise EngineError(f"{self}: already started (pid {self._proc.pid})")
        if self._requested_port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.host, self._requested_port):
            # Otherwise whatever listens there could answer the health probe.
            raise EngineError(f"{self}: port {self._requested_port} on {self.host} is already in use")
        assert self.port is not None
        return self.port

    async def launch(self, cmd: list[str], env: dict[str, str], timeout_s: float, what: str) -> None:
        """Start ``cmd`` (after :meth:`pick_port`) and wait until the health route answers 200."""
        self._open_log()
        assert self._log_file is not None
        self._log_file.write(f"=== {self.label}: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        # A file, not a pipe: nobody reads the output while the server runs, and a full
        # pipe would block its logging. A new session makes the server the leader of a
        # process group that holds its engine and worker processes too. Popen rather than
        # asyncio's subprocess API, which would tie the process to one event loop.
        try:
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            await self._release()
            raise EngineError(f"{self}: cannot launch {cmd[0]}: {exc}") from exc
        self._session = aiohttp.ClientSession()
        try:
            await self._wait_ready(timeout_s, what)
        except BaseException:
            await self.stop()
            raise

    def _open_log(self) -> None:
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self._log_dir / f"{self._log_name}.log"
            self._owns_log = False
        else:
            fd, tmp = tempfile.mkstemp(prefix=f"{self._log_name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(tmp)
            self._owns_log = True
        self._log_file = self.log_path.open("ab")

    def tail(self) -> str:
        if self.log_path is None:
            return "<no log>"
        return f"last lines of {self.log_path}:\n{log_tail(self.log_path, _LOG_TAIL_LINES)}"

    def exit_status(self) -> str | None:
        """How the server exited, or None while it runs.

        WNOWAIT leaves an exited server unreaped: its zombie keeps the process group id
        reserved, so ``stop`` can still signal that group without reaching strangers.
        """
        assert self._proc is not None
        try:
            result = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "exited (already reaped)"
        if result is None:
            return None
        if result.si_code == os.CLD_EXITED:
            return f"exited with status {result.si_status}"
        return f"killed by signal {signal.Signals(result.si_status).name}"

    async def _wait_ready(self, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            healthy = await self._probe_health(min(_HEALTH_TIMEOUT_S, max(deadline - time.monotonic(), 0.1)))
            status = self.exit_status()
            if status is not None:
                raise EngineError(f"{self}: {what} {status} during start-up; {self.tail()}")
            if healthy:
                return
            if time.monotonic() >= deadline:
                raise EngineError(f"{self}: GET {self._health_path} not OK within {timeout_s:g}s; {self.tail()}")
            await asyncio.sleep(_PROBE_INTERVAL_S)

    async def _probe_health(self, timeout_s: float) -> bool:
        if self._session is None:
            return False
        try:
            async with self._session.get(
                f"{self.base_url}{self._health_path}", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def health(self) -> bool:
        if self._proc is None or self.exit_status() is not None:
            return False
        return await self._probe_health(_HEALTH_TIMEOUT_S)

    async def stop(self, timeout_s: float = 10) -> None:
        proc = self._proc
        if proc is None:
            return
        if self.exit_status() is None:
            self._signal_group(signal.SIGTERM)
            if not await self._wait_exited(timeout_s):
                logger.warning("%s: still running %gs after SIGTERM; sending SIGKILL", self, timeout_s)
                self._signal_group(signal.SIGKILL)
                if not await self._wait_exited(timeout_s):
                    raise EngineError(f"{self}: pid {proc.pid} survived SIGKILL for {timeout_s:g}s")
        # The engine core and workers share the group and may hold the listening socket.
        self._signal_group(signal.SIGKILL)
        proc.wait(timeout=timeout_s)
        # Killed helpers linger (as zombies of init) until reaped; while any does, the
        # group id stays reserved, so probing it cannot reach another process.
        await self._wait_until(
            lambda: not self._group_alive(proc.pid), timeout_s, f"process group {proc.pid} still has members"
        )
        self._proc = None
        await self._release()
        port = self.port
        assert port is not None
        await self._wait_until(lambda: port_is_free(self.host, port), timeout_s, f"port {port} still in use")
        if self._requested_port is None:
            self.port = None
        logger.info("%s: stopped (pid %d)", self, proc.pid)

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    async def _wait_until(self, condition: Callable[[], bool], timeout_s: float, failure: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() >= deadline:
                raise EngineError(f"{self}: {failure} {timeout_s:g}s after the server exited")
            await asyncio.sleep(_EXIT_POLL_S)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    async def _wait_exited(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.exit_status() is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_EXIT_POLL_S)
        return True

    async def _release(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One control call; any transport error or non-2xx answer becomes an EngineError."""
        if self._session is None:
            raise EngineError(f"{self}: not started")
        what = f"{method} {path}" + (f"?{'&'.join(f'{k}={v}' for k, v in params.items())}" if params else "")
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._control_timeout_s)
        try:
            async with self._session.request(
                method, f"{self.base_url}{path}", params=params, json=body, timeout=timeout
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineError(f"{self}: {what} failed: {exc!r}") from exc
        if status >= 400:
            raise EngineError(f"{self}: {what} answered HTTP {status}: {text[:_ERROR_BODY_CHARS]}")
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            # Some control routes answer plain text; the caller only needs success.
            return text


def require_safetensors(replica: object, weights_dir: str) -> Path:
    """The folder a replica will load, resolved; an engine would fail deep in its loader instead."""
    path = Path(weights_dir).resolve()
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise EngineError(f"{replica}: no *.safetensors files in {path}")
    return path


class ServerReplica(InferenceReplica):
    """An :class:`InferenceReplica` backed by one :class:`ServerProcess`.

    Subclasses give the engine's name, command line and environment, and the control
    calls; start, stop, health and the process plumbing are the same for every engine.
    """

    engine: str = "server"

    def __init__(
        self,
        spec: ReplicaSpec,
        name: str,
        log_dir: str | os.PathLike[str] | None,
        control_timeout_s: float,
    ) -> None:
        self.name = name
        self.policy_version = 0
        self._spec = spec
        self._server = ServerProcess(
            f"{self.engine} replica {name!r}", spec.host, spec.port, log_dir, name, control_timeout_s
        )

    def __repr__(self) -> str:
        return repr(self._server)

    __str__ = __repr__

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def pid(self) -> int | None:
        return self._server.pid

    @property
    def log_path(self) -> Path | None:
        return self._server.log_path

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._spec.env)
        return env

    async def start(self, timeout_s: float) -> None:
        started = time.monotonic()
        port = self._server.pick_port()
        await self._server.launch(self.command(port), self.environment(), timeout_s, self.engine)
        try:
            await self._after_start()
        except BaseException:
            await self.stop()
            raise
        self.policy_version = 0
        logger.info("%s: ready in %.1fs (pid %d, log %s)", self, time.monotonic() - started, self.pid, self.log_path)

    async def _after_start(self) -> None:
        """Engine-specific set-up once the server answers."""

    async def health(self) -> bool:
        return await self._server.health()

    async def stop(self, timeout_s: float = 10) -> None:
        await self._server.stop(timeout_s)
