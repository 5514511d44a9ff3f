"""Everything besides the trainer that one command starts: the Atropos API and the environments.

* :func:`ensure_api` starts ``run-api`` at ``atropos.api_url`` when nothing answers
  there (or always / never, per ``atropos.start_api``).
* :class:`EnvSupervisor` runs each configured environment as ``serve`` with the
  API URL, tokenizer and gateway injected, so unmodified Atropos environments
  work; an environment that exits is logged with its last lines and restarted
  with backoff, up to ``data.max_restarts`` times in a row, after which the run
  stops with a clear error.

Processes are started in their own sessions and stopped by PID (their process
group), never by name.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from atropos_verl.atropos.api_server import ApiServerProcess, api_answers
from atropos_verl.config import AtroposConfig, DataConfig, EnvSpec
from atropos_verl.netutil import log_tail
from atropos_verl.procs import ChildProcess

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# An environment that ran this long without exiting has its restart count reset.
HEALTHY_UPTIME_S = 120.0
_STOP_TIMEOUT_S = 15.0


class EnvironmentFailedError(RuntimeError):
    """An environment kept exiting; the message names it and shows its last log lines."""


async def ensure_api(cfg: AtroposConfig, log_dir: Path) -> Optional[ApiServerProcess]:
    """Start ``run-api`` at ``atropos.api_url`` if the config asks for it; returns the process we own."""
    mode = cfg.start_api
    if mode == "never":
        return None
    parts = urlsplit(cfg.api_url)
    if mode == "auto":
        if await asyncio.to_thread(api_answers, cfg.api_url):
            logger.info("using the Atropos API already running at %s", cfg.api_url)
            return None
        if parts.hostname not in LOOPBACK_HOSTS:
            # Starting a server on another machine is not ours to do; the client will report it unreachable.
            return None
    log_dir.mkdir(parents=True, exist_ok=True)
    server = await asyncio.to_thread(
        ApiServerProcess.start,
        host="127.0.0.1" if parts.hostname == "localhost" else parts.hostname,
        port=parts.port,
        log_path=log_dir / "run-api.log",
    )
    logger.info("started the Atropos API at %s (pid %d, log %s)", server.url, server.pid, server.log_path)
    return server


def env_command(
    spec: EnvSpec, api_url: str, model_path: str, gateway: Optional[tuple[str, str]], api_key: Optional[str]
) -> list[str]:
    """``serve`` with what the trainer knows injected first; the spec's own args come last and win.

    ``gateway`` is (URL, served model name) when the trainer runs the engines.
    """
    entry = ["-m", spec.module] if spec.module else [spec.script]
    cmd = [sys.executable, *entry, "serve", "--env.rollout_server_url", api_url, "--env.tokenizer_name", model_path]
    if gateway is not None:
        url, model_name = gateway
        cmd += [
            "--openai.base_url", f"{url}/v1",
            "--openai.model_name", model_name,
            "--openai.tokenizer_name", model_path,
            "--openai.server_type", spec.server_type,
            # The OpenAI client refuses an empty key; the gateway ignores it unless it has one.
            "--openai.api_key", api_key or "unused",
        ]  # fmt: skip
    return cmd + list(spec.args)


SECRET_FLAGS = ("--openai.api_key",)


def redacted(command: list[str]) -> list[str]:
    """The command with the values of secret flags replaced, for logs."""
    shown = list(command)
    for index, arg in enumerate(shown[:-1]):
        if arg in SECRET_FLAGS and shown[index + 1] != "unused":
            shown[index + 1] = "***"
    return shown


@dataclass
class _EnvProcess:
    spec: EnvSpec
    index: int
    command: list[str]
    child: ChildProcess
    started_at: float = 0.0
    consecutive_restarts: int = 0
    next_start_at: Optional[float] = None

    @property
    def label(self) -> str:
        return f"{self.spec.name}[{self.index}]"

    def start(self) -> None:
        self.child.start(self.command, shown=redacted(self.command))
        self.started_at = time.monotonic()
        self.next_start_at = None


class EnvSupervisor:
    """Starts the configured environments and keeps them running until :meth:`stop`."""

    def __init__(self, cfg: DataConfig, log_dir: Path, poll_interval_s: float = 0.5):
        self.cfg = cfg
        self.log_dir = log_dir
        self.poll_interval_s = poll_interval_s
        self.processes: list[_EnvProcess] = []
        self.failed = asyncio.Event()
        self.failure: Optional[str] = None
        self._task: Optional[asyncio.Task] = None

    def start(self, api_url: str, model_path: str, gateway: Optional[tuple[str, str]], api_key: Optional[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.cfg.envs:
            command = env_command(spec, api_url, model_path, gateway, api_key)
            for index in range(spec.replicas):
                label = f"environment {spec.name}[{index}]"
                process = _EnvProcess(
                    spec, index, command, ChildProcess(label, self.log_dir / f"{spec.name}-{index}.log")
                )
                process.start()
                logger.info("started %s (pid %d, log %s)", label, process.child.pid, process.child.log_path)
                self.processes.append(process)
        if self.processes:
            self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            now = time.monotonic()
            for process in self.processes:
                if process.next_start_at is not None:
                    if now >= process.next_start_at:
                        process.start()
                        logger.info("restarted environment %s (pid %d)", process.label, process.child.pid)
                    continue
                code = process.child.returncode()
                if code is None:
                    if now - process.started_at > HEALTHY_UPTIME_S:
                        process.consecutive_restarts = 0
                    continue
                self._handle_exit(process, code, now)
                if self.failed.is_set():
                    return
            await asyncio.sleep(self.poll_interval_s)

    def _handle_exit(self, process: _EnvProcess, code: int, now: float) -> None:
        # Reaps it and whatever it left in its group before a restart reuses the log.
        process.child.stop()
        tail = log_tail(process.child.log_path, 15)
        log_path = process.child.log_path
        max_restarts = self.cfg.max_restarts
        if process.consecutive_restarts >= max_restarts:
            self.failure = (
                f"environment {process.label} exited with status {code} and was already restarted "
                f"{max_restarts} times in a row (data.max_restarts); last lines of {log_path}:\n{tail}"
            )
            logger.error(self.failure)
            self.failed.set()
            return
        delay = self.cfg.restart_backoff * 2**process.consecutive_restarts
        process.consecutive_restarts += 1
        process.next_start_at = now + delay
        logger.warning(
            "environment %s exited with status %s; restarting in %.1fs (%d/%d). Last lines of %s:\n%s",
            process.label, code, delay, process.consecutive_restarts, max_restarts, log_path, tail,
        )  # fmt: skip

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.to_thread(lambda: [p.child.stop(_STOP_TIMEOUT_S) for p in self.processes])
