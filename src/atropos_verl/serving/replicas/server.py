"""One HTTP server process the trainer owns: launch, readiness, control calls, stop by PID.

Shared by the engine adapters (vLLM, SGLang): they decide the command line and the
control routes, this module runs the process and talks to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from atropos_verl.netutil import free_port, http_url, port_is_free
from atropos_verl.procs import ChildFailed, ChildProcess, http_ok
from atropos_verl.ray_nodes import RemoteChild
from atropos_verl.serving.replicas.access import TOKEN_ENV, TOKEN_HEADER
from atropos_verl.serving.replicas.base import EngineError, InferenceReplica, ReplicaSpec

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40
_EXIT_POLL_S = 0.05
_HEALTH_TIMEOUT_S = 2.0
_ERROR_BODY_CHARS = 2000


class ServerProcess:
    """An HTTP server child process (see :class:`~atropos_verl.procs.ChildProcess`) and a session to talk to it."""

    def __init__(
        self,
        label: str,
        host: str,
        port: int | None,
        log_dir: str | os.PathLike[str] | None,
        log_name: str,
        control_timeout_s: float,
        health_path: str = "/health",
        headers: dict[str, str] | None = None,
        ray_resources: dict[str, float] | None = None,
    ) -> None:
        """``ray_resources``: start the server on a Ray node that has them (see atropos_verl.ray_nodes)."""
        self.label = label
        self.host = host
        self._requested_port = port
        self.port: int | None = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._log_name = log_name
        self._control_timeout_s = control_timeout_s
        self._health_path = health_path
        # Sent with every control call (the replica token).
        self._headers = dict(headers or {})
        self._child: ChildProcess | None = None
        self._session: aiohttp.ClientSession | None = None
        self._remote: RemoteChild | None = None
        if ray_resources:
            if self._log_dir is None:
                raise EngineError(f"{label}: a server placed on a Ray node needs a log folder")
            self._remote = RemoteChild(label, self._log_dir / f"{log_name}.log", ray_resources, _LOG_TAIL_LINES)

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
        return self._child.pid if self._child is not None and self._child.running else None

    @property
    def log_path(self) -> Path | None:
        return self._child.log_path if self._child is not None else None

    def pick_port(self) -> int:
        if self._child is not None and self._child.running:
            raise EngineError(f"{self}: already started (pid {self._child.pid})")
        if self._remote is not None:
            # Its node's address, as Ray reports it: where the gateway reaches it.
            try:
                self.host = self._remote.place()
            except ChildFailed as exc:
                raise EngineError(str(exc)) from None
        if self._requested_port is None:
            self.port = self._remote.free_port(self.host) if self._remote is not None else free_port(self.host)
        elif not self._port_is_free(self._requested_port):
            # Otherwise whatever listens there could answer the health probe.
            raise EngineError(f"{self}: port {self._requested_port} on {self.host} is already in use")
        assert self.port is not None
        return self.port

    def _port_is_free(self, port: int) -> bool:
        if self._remote is not None:
            return self._remote.port_is_free(self.host, port)
        return port_is_free(self.host, port)

    def _log_file(self) -> Path:
        if self._log_dir is not None:
            return self._log_dir / f"{self._log_name}.log"
        fd, tmp = tempfile.mkstemp(prefix=f"{self._log_name}-", suffix=".log")
        os.close(fd)
        return Path(tmp)

    async def launch(self, cmd: list[str], env: dict[str, str], timeout_s: float, what: str) -> None:
        """Start ``cmd`` (after :meth:`pick_port`) and wait until the health route answers 200."""
        self._child = self._remote or ChildProcess(str(self), self._log_file(), tail_lines=_LOG_TAIL_LINES)
        try:
            self._child.start(cmd, env)
        except ChildFailed as exc:
            await self._release()
            raise EngineError(str(exc)) from None
        self._session = aiohttp.ClientSession(headers=self._headers)
        health_url = f"{self.base_url}{self._health_path}"
        try:
            await asyncio.to_thread(
                self._child.wait_ready,
                lambda: http_ok(health_url, _HEALTH_TIMEOUT_S),
                timeout_s,
                f"GET {self._health_path}",
            )
        except ChildFailed as exc:
            await self.stop()
            raise EngineError(f"{what}: {exc}") from None
        except BaseException:
            await self.stop()
            raise

    def tail(self) -> str:
        return self._child.tail() if self._child is not None else "<no log>"

    def exit_status(self) -> str | None:
        """How the server exited, or None while it runs."""
        return self._child.exit_status() if self._child is not None else "not started"

    async def health(self) -> bool:
        if self._child is None or not self._child.running or self._session is None:
            return False
        try:
            async with self._session.get(
                f"{self.base_url}{self._health_path}", timeout=aiohttp.ClientTimeout(total=_HEALTH_TIMEOUT_S)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def stop(self, timeout_s: float = 10, port_held_by_another: bool = False) -> None:
        """Stop the child by PID and wait until its port is free (not when ``port_held_by_another``)."""
        child = self._child
        if child is None or (self._session is None and not child.running):
            # Never started, or already stopped and released.
            return
        pid = child.pid
        try:
            await asyncio.to_thread(child.stop, timeout_s)
        except ChildFailed as exc:
            raise EngineError(str(exc)) from None
        await self._release()
        port = self.port
        assert port is not None
        deadline = time.monotonic() + timeout_s
        while not port_held_by_another and not self._port_is_free(port):
            if time.monotonic() >= deadline:
                raise EngineError(f"{self}: port {port} still in use {timeout_s:g}s after the server exited")
            await asyncio.sleep(_EXIT_POLL_S)
        if self._requested_port is None:
            self.port = None
        logger.info("%s: stopped (pid %s)", self, pid)

    async def _release(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._child is not None and self._log_dir is None:
            self._child.log_path.unlink(missing_ok=True)

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
            f"{self.engine} replica {name!r}",
            spec.host,
            spec.port,
            log_dir,
            name,
            control_timeout_s,
            headers={TOKEN_HEADER: spec.access_token} if spec.access_token else None,
            ray_resources=spec.ray_resources,
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

    @property
    def host(self) -> str:
        """The address the server listens on: ``spec.host``, or its Ray node's."""
        return self._server.host

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self._spec.access_token:
            env[TOKEN_ENV] = self._spec.access_token
        env.update(self._spec.env)
        return env

    async def start(self, timeout_s: float) -> None:
        started = time.monotonic()
        # A free port can be taken by another process (one of Ray's agents, starting beside the replica) before
        # the server binds it; that process may answer the health route, so readiness also asks who answers.
        for attempt in (1, 2):
            port = self._server.pick_port()
            await self._server.launch(self.command(port), self.environment(), timeout_s, self.engine)
            if await self._serves_the_policy():
                break
            await self._server.stop(port_held_by_another=True)
            message = (
                f"{self}: port {port} is answered by another process, not the {self.engine} server this replica "
                f"started (it does not list {self._spec.served_model_name!r} at /v1/models)"
            )
            if self._spec.port is not None or attempt == 2:
                raise EngineError(f"{message}: free the port or leave the engine's port unset")
            logger.warning("%s; starting the server again on another port", message)
        try:
            await self._after_start()
        except BaseException:
            await self.stop()
            raise
        self.policy_version = 0
        logger.info("%s: ready in %.1fs (pid %d, log %s)", self, time.monotonic() - started, self.pid, self.log_path)

    async def _serves_the_policy(self) -> bool:
        """Whether the server answering on the port is this replica's: it lists the served model name."""
        try:
            body = await self._server.request("GET", "/v1/models")
        except EngineError:
            return False
        models = body.get("data") if isinstance(body, dict) else None
        ids = [m.get("id") for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        return self._spec.served_model_name in ids

    async def _after_start(self) -> None:
        """Engine-specific set-up once the server answers."""

    async def health(self) -> bool:
        return await self._server.health()

    async def stop(self, timeout_s: float = 10) -> None:
        await self._server.stop(timeout_s)
