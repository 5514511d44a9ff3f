"""Helpers for tests that run the whole system as subprocesses: marking, finding and stopping them."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import psutil

from atropos_verl.netutil import free_port
from atropos_verl.procs import ChildProcess

REPO = Path(__file__).resolve().parents[1]
# Every process a run starts inherits this variable, so tests can find (and account for) them all.
MARKER = "ATROPOS_VERL_TEST_RUN"


def train_command(*overrides: str, multirun: bool = False) -> list[str]:
    # Hydra's flags must precede the overrides.
    flags = ["-m"] if multirun else []
    return [sys.executable, "-m", "atropos_verl.train", *flags, "hydra.searchpath=[file://tests/conf]", *overrides]


def spawn(cmd: list[str], log_path: Path, marker: str | None = None, extra_env: dict | None = None) -> ChildProcess:
    """``cmd`` in its own process group (Ray's and vLLM's helpers included), run from the repository."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    if marker:
        env[MARKER] = marker
    Path(log_path).unlink(missing_ok=True)
    child = ChildProcess(Path(cmd[-1]).name, Path(log_path))
    child.start(cmd, env=env, cwd=REPO)
    return child


def wait_exit(child: ChildProcess, timeout: float) -> int | None:
    """The exit code within ``timeout`` seconds, else None (the child is left running)."""
    deadline = time.monotonic() + timeout
    while child.returncode() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return child.returncode()


def processes_with_marker(marker: str) -> list[int]:
    """PIDs whose environment carries the marker: what the run started, however deep.

    Not a process that rewrote its environment block: vLLM retitles its engine core and workers
    (setproctitle), which hides the marker; :func:`run_tree` also follows the process tree.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER}={marker}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def run_tree(root_pid: int, marker: str) -> list[psutil.Process]:
    """Everything of a run now: the root, its descendants, and any process carrying the marker (reparented too)."""
    found = {}
    try:
        root = psutil.Process(root_pid)
        found.update((p.pid, p) for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        pass
    for pid in processes_with_marker(marker):
        try:
            found.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def alive(processes: list[psutil.Process]) -> dict[int, str]:
    """Those of ``processes`` still running (a zombie holds nothing and counts as gone), with their command lines."""
    left = {}
    for proc in processes:
        try:
            # is_running() also compares the start time, so a reused PID is not mistaken for ours.
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left[proc.pid] = cmdline(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return left


def listening_ports(processes: list[psutil.Process]) -> dict[int, str]:
    """TCP ports these processes listen on, any address, with the address and who holds each."""
    ports = {}
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    ports[conn.laddr.port] = f"{conn.laddr.ip} pid {proc.pid} {cmdline(proc.pid)[:120]}"
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return ports


def listeners_on(ports) -> dict[int, str]:
    """Of ``ports``, those some process on this machine still listens on (any address), with the holder."""
    wanted = set(ports)
    return {
        conn.laddr.port: f"{conn.laddr.ip} pid {conn.pid} {cmdline(conn.pid)[:120] if conn.pid else ''}"
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in wanted
    }


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def base_overrides(api_port: int, steps: int) -> list[str]:
    """A small, fast CPU run of the tiny model, fed by the test's own environments (data=atropos)."""
    return [
        "data=atropos",
        "model.path=builtin:tiny-llama",
        f"atropos.api_url=http://127.0.0.1:{api_port}",
        "trainer.device=cpu",
        "trainer.batch_size=8",
        "trainer.max_token_len=256",
        f"trainer.total_training_steps={steps}",
        "trainer.logger=[]",
        "trainer.progress_bar=false",
        "actor.dtype=float32",
        "actor.lr=1e-3",
    ]


def run_to_end(cmd: list[str], log_path: Path, marker: str | None = None, timeout: float = 600) -> tuple[int, str]:
    child = spawn(cmd, log_path, marker)
    try:
        code = wait_exit(child, timeout)
    finally:
        child.stop(timeout_s=60)
    return code if code is not None else -1, Path(log_path).read_text()


def train_scripted(tmp_path: Path, run_dir: Path, steps: int, name: str, *overrides: str) -> str:
    """A run to ``steps`` in ``run_dir`` fed the same scored groups every step (the scripted
    environment, no engine): identical data makes resumed and uninterrupted runs comparable.
    Its log is ``tmp_path/<name>.log``; fails unless it exits 0."""
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps),
            *overrides,
            "data=scripted",
            "data.envs.0.args=[--env.pattern,score]",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / name}",
        ),
        tmp_path / f"{name}.log",
    )
    assert code == 0, log[-5000:]
    return log
