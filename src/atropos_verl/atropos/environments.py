"""Everything besides the trainer that one command starts: the Atropos API and the environments.

* :func:`ensure_api` starts ``run-api`` at ``atropos.api_url`` when nothing answers
  there (or always / never, per ``atropos.start_api``).
* :class:`EnvSupervisor` runs each configured environment as ``serve`` through
  :mod:`atropos_verl.atropos.run_env` (atroposlib fixes applied) with the API URL,
  tokenizer, gateway and the run's facts (:class:`EnvLaunch`) injected, so
  unmodified Atropos environments work. A usage error (bad flag, missing file,
  failed import) fails the run at once; any other exit is logged with its last
  lines and restarted with backoff, up to ``data.max_restarts`` times in a row,
  after which the run stops with a clear error.

Processes are started in their own sessions and stopped by PID (their process
group), never by name.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from atropos_verl.atropos.api_server import ApiServerProcess, api_answers
from atropos_verl.atropos.evals import EvalReports
from atropos_verl.atropos.run_env import API_KEY_ENV
from atropos_verl.config import AtroposConfig, DataConfig, EnvSpec, TrainerConfig
from atropos_verl.netutil import free_port, log_tail
from atropos_verl.procs import ChildProcess
from atropos_verl.ray_nodes import RemoteChild

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# An environment that ran this long without exiting has its restart count reset.
HEALTHY_UPTIME_S = 120.0
# An exit this soon after start is a start-up failure: importing torch, transformers and
# atroposlib before argument parsing takes tens of seconds on a busy CPU.
STARTUP_WINDOW_S = 90.0
# Start-up failures no restart can fix: argparse's usage message (exit status 2), a
# missing entry file, a failed import.
_USAGE_ERROR = re.compile(
    r"^usage: |can't open file|No module named|^(ModuleNotFoundError|ImportError|FileNotFoundError): ",
    re.MULTILINE,
)
_STOP_TIMEOUT_S = 15.0


class EnvironmentFailedError(RuntimeError):
    """An environment kept exiting; the message names it and shows its last log lines."""


def api_address(cfg: AtroposConfig) -> tuple[str, int]:
    """Host and port the run's API answers on (``atropos.api_url``), for the front when we start the API."""
    parts = urlsplit(cfg.api_url)
    host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
    return host, parts.port or free_port(host)


async def ensure_api(cfg: AtroposConfig, log_dir: Path) -> Optional[ApiServerProcess]:
    """Start ``run-api`` if the config asks for it; returns the process we own.

    Ours listens on a private loopback port: the trainer puts the front (atropos/front.py) on
    ``atropos.api_url`` before it, so environments never reach run-api's queue directly.
    """
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
    server = await asyncio.to_thread(ApiServerProcess.start, host="127.0.0.1", log_path=log_dir / "run-api.log")
    logger.info("started the Atropos API behind %s (pid %d, log %s)", cfg.api_url, server.pid, server.log_path)
    return server


RUN_LONG_AS_THE_TRAINER = 1_000_000_000


@dataclass(frozen=True)
class EnvLaunch:
    """Facts of the run every environment is told, as ``--env.*`` flags (a spec's own args still win).

    Group size is not among them: it is each environment's own choice (``data.group_size``
    sets it for all when given), and the API packs groups into ``trainer.batch_size``.
    """

    max_token_length: Optional[int] = None
    # The trainer stops its environments when the run ends. atroposlib's own stop counts
    # batches the API formed, which run ahead of the steps trained and are consumed by
    # rejected groups too: an env told the run's step count would leave the last steps
    # without data, and a stock default (1000) would end a longer run early.
    total_steps: Optional[int] = None
    # Stock environments default to use_wandb=True and exit without a wandb login. With wandb
    # on, they read the project and group from the API, where the trainer registered
    # atropos.wandb_project / wandb_group.
    use_wandb: bool = False
    # Groups an environment samples at once. atroposlib's default (8 per node) fills a batch of
    # 32 groups in four waves: the first GSM8K batch of 256 answers took ~90 s on an H200
    # whose vLLM ran 64 sequences at a time. With data.group_size known, one batch's groups
    # are in flight together (never fewer than the default); otherwise each env keeps its own.
    max_num_workers: Optional[int] = None

    @classmethod
    def for_run(cls, trainer: TrainerConfig, group_size: Optional[int] = None) -> EnvLaunch:
        workers = max(8, -(-trainer.batch_size // group_size)) if group_size else None
        return cls(trainer.max_token_len, RUN_LONG_AS_THE_TRAINER, "wandb" in trainer.logger, workers)


def env_command(
    spec: EnvSpec,
    api_url: str,
    model_path: str,
    gateway: Optional[tuple[str, str]],
    launch: EnvLaunch = EnvLaunch(),
    group_size: Optional[int] = None,
    eval_dir: Optional[Path] = None,
    temperature: Optional[float] = None,
) -> list[str]:
    """``serve`` through the compat runner with what the trainer knows injected first; the spec's args win.

    ``eval_dir`` is where the environment's ``evaluate_log`` writes its results (atropos.evals).

    ``gateway`` is (URL, served model name) when the trainer runs the engines; its API key
    goes in the environment (see :func:`env_environ`), never in the command.
    """
    entry = ["-m", spec.module] if spec.module else [spec.script]
    cmd = [sys.executable, "-m", "atropos_verl.atropos.run_env", *entry, "serve"]
    cmd += ["--env.rollout_server_url", api_url, "--env.tokenizer_name", model_path]
    cmd += ["--env.use_wandb", "true" if launch.use_wandb else "false"]
    if launch.use_wandb:
        cmd += ["--env.wandb_name", spec.name]
    if launch.max_token_length is not None:
        cmd += ["--env.max_token_length", str(launch.max_token_length)]
    if launch.total_steps is not None:
        cmd += ["--env.total_steps", str(launch.total_steps)]
    if launch.max_num_workers is not None:
        cmd += ["--env.max_num_workers", str(launch.max_num_workers)]
    if group_size is not None:
        cmd += ["--env.group_size", str(group_size)]
    if eval_dir is not None:
        cmd += ["--env.data_dir_to_save_evals", str(eval_dir)]
    if temperature is not None:
        cmd += ["--env.temperature", str(temperature)]
    if gateway is not None:
        url, model_name = gateway
        cmd += [
            "--openai.base_url", f"{url}/v1",
            "--openai.model_name", model_name,
            "--openai.tokenizer_name", model_path,
            "--openai.server_type", spec.server_type,
        ]  # fmt: skip
    return cmd + spec.argv()


def env_environ(gateway: Optional[tuple[str, str]], api_key: Optional[str]) -> Optional[dict[str, str]]:
    """The environment's process environment: the gateway's key for the runner to pass on."""
    if gateway is None:
        return None
    # The OpenAI client refuses an empty key; the gateway ignores it unless it has one.
    return {**os.environ, API_KEY_ENV: api_key or "unused"}


def preflight(cfg: DataConfig) -> None:
    """Fail in a line naming ``data.envs[i]`` when an environment's script or module does not exist."""
    for index, spec in enumerate(cfg.envs):
        where = f"data.envs[{index}] ({spec.name})"
        if spec.script is not None and not Path(spec.script).is_file():
            raise EnvironmentFailedError(
                f"{where}: script {spec.script} not found (relative to {Path.cwd()}); give the path of the "
                "environment's .py file"
            )
        if spec.module is not None:
            try:
                found = importlib.util.find_spec(spec.module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise EnvironmentFailedError(
                    f"{where}: module {spec.module} is not importable; install its package or give a script"
                )


def usage_error(code: int, uptime_s: float, log_text: str) -> bool:
    """An exit no restart can fix: early, and argparse's status or a missing-file / import signature."""
    return code > 0 and uptime_s < STARTUP_WINDOW_S and (code == 2 or _USAGE_ERROR.search(log_text) is not None)


def _this_attempt(log_text: str) -> str:
    """The output since the last start: ChildProcess appends each start's header line to one log."""
    marker = log_text.rfind("=== environment ")
    return log_text[marker:].split("\n", 1)[-1] if marker >= 0 else log_text


def _last_message(log_text: str) -> str:
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


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
    environ: Optional[dict[str, str]]
    started_at: float = 0.0
    consecutive_restarts: int = 0
    next_start_at: Optional[float] = None
    finished: bool = False

    @property
    def label(self) -> str:
        return f"{self.spec.name}[{self.index}]"

    def start(self) -> None:
        self.child.start(self.command, env=self.environ, shown=redacted(self.command))
        self.started_at = time.monotonic()
        self.next_start_at = None


class EnvSupervisor:
    """Starts the configured environments and keeps them running until :meth:`stop`."""

    def __init__(self, cfg: DataConfig, log_dir: Path, poll_interval_s: float = 0.5):
        preflight(cfg)
        self.cfg = cfg
        self.log_dir = log_dir
        self.poll_interval_s = poll_interval_s
        self.processes: list[_EnvProcess] = []
        self.failed = asyncio.Event()
        self.failure: Optional[str] = None
        self._task: Optional[asyncio.Task] = None
        self._owner: Optional[asyncio.Task] = None
        self.evals = EvalReports()

    def start(
        self,
        api_url: str,
        model_path: str,
        gateway: Optional[tuple[str, str]],
        api_key: Optional[str],
        launch: EnvLaunch = EnvLaunch(),
    ) -> None:
        """``launch``: the run's facts, ``EnvLaunch.for_run(cfg.trainer)`` from the trainer."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._owner = asyncio.current_task()
        environ = env_environ(gateway, api_key)
        for spec in self.cfg.envs:
            for index in range(spec.replicas):
                eval_dir = self.log_dir / "evals" / f"{spec.name}-{index}"
                self.evals.add(eval_dir, spec.name)
                command = env_command(
                    spec,
                    api_url,
                    model_path,
                    gateway,
                    launch,
                    self.cfg.group_size,
                    eval_dir=eval_dir,
                    temperature=self.cfg.temperature,
                )
                label = f"environment {spec.name}[{index}]"
                log_path = self.log_dir / f"{spec.name}-{index}.log"
                child = (
                    RemoteChild(label, log_path, spec.ray_resources)
                    if spec.ray_resources
                    else ChildProcess(label, log_path)
                )
                process = _EnvProcess(spec, index, command, child, environ)
                process.start()
                logger.info("started %r (log %s)", process.child, process.child.log_path)
                self.processes.append(process)
        if self.processes:
            self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            now = time.monotonic()
            for process in self.processes:
                if process.finished:
                    continue
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
                if code == 0:
                    # atroposlib's serve returns once the API's step count passes --env.total_steps.
                    process.child.stop()
                    process.finished = True
                    logger.info("environment %s finished (exit status 0); not restarted", process.label)
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
        attempt = _this_attempt(log_tail(log_path, 60))
        if usage_error(code, now - process.started_at, attempt):
            self.failure = (
                f"environment {process.label} could not start (exit status {code}): {_last_message(attempt)}\n"
                f"last lines of {log_path}:\n{tail}"
            )
            logger.error(self.failure)
            self.failed.set()
            # The run may be minutes from waiting for a batch (engines still starting);
            # stopping it now unwinds it the way SIGTERM does.
            if self._owner is not None:
                self._owner.cancel(self.failure)
            return
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
