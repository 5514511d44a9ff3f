"""Helpers for tests that run the whole system as subprocesses: marking, finding and stopping them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every process a run starts inherits this variable, so tests can find (and account for) them all.
MARKER = "ATROPOS_VERL_TEST_RUN"


def train_command(*overrides: str, multirun: bool = False) -> list[str]:
    # Hydra's flags must precede the overrides.
    flags = ["-m"] if multirun else []
    return [sys.executable, "-m", "atropos_verl.train", *flags, "hydra.searchpath=[file://tests/conf]", *overrides]


def spawn(cmd: list[str], log_path: Path, marker: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if marker:
        env[MARKER] = marker
    log = open(log_path, "w")
    # A new session makes the process group ours to stop, Ray's and vLLM's helpers included.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: signal.Signals = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def processes_with_marker(marker: str) -> list[int]:
    """PIDs whose environment carries the marker: everything the run started, however deep."""
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


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def base_overrides(api_port: int, steps: int) -> list[str]:
    """A small, fast CPU run of the tiny model."""
    return [
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
    proc = spawn(cmd, log_path, marker)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return proc.returncode, Path(log_path).read_text()
