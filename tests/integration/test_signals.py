"""SIGTERM, SIGINT and SIGHUP stop a run from any phase: exit status 128 + signal number, nothing left.

Each case runs the real trainer (tiny model on CPU, real run-api, the scripted BaseEnv,
Ray and verl workers) and signals it during start-up (while the policy workers start),
while training (after step 1), or while it waits for data; SIGINT goes to the whole
process group, as a terminal's Ctrl-C does. The waiting case runs an environment
whose groups all score the same, so the trainer must also say why no batch forms.
"""

import os
import signal
import time
import uuid

import pytest
from procs import base_overrides, cmdline, listening, processes_with_marker, spawn, train_command, wait_exit

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration

EXIT_WITHIN_S = 60
PHASE_WITHIN_S = 150
# The first "why no batch" line comes 15 s into a wait; the issue asks for one within 60 s.
REASON_WITHIN_S = 60
HINT_AFTER_S = 10


def _wait_for(condition, timeout_s: float, what: str, trainer) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert trainer.running, f"the trainer exited before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s"
        time.sleep(0.25)


def _has_step(run_dir) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and bool(path.read_text().strip()) and read_metrics(path)[0]["step"] == 1


CASES = [
    ("startup", signal.SIGINT),
    ("startup", signal.SIGTERM),
    ("training", signal.SIGTERM),
    ("waiting", signal.SIGTERM),
    ("waiting", signal.SIGINT),
    ("waiting", signal.SIGHUP),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("phase", "sig"), CASES, ids=[f"{p}-{s.name}" for p, s in CASES])
def test_signal_stops_everything(tmp_path, phase, sig):
    api_port = free_port()
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    pattern = "equal" if phase == "waiting" else "score"
    cmd = train_command(
        *base_overrides(api_port, steps=1000),
        "data=scripted",
        f"data.envs.0.args=[--env.pattern,{pattern}]",
        f"atropos.starvation_hint_after={HINT_AFTER_S}",
        f"trainer.run_dir={run_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    log_path = tmp_path / "trainer.log"
    trainer = spawn(cmd, log_path, marker)
    try:
        log = log_path.read_text
        if phase == "startup":
            # Sent while the policy workers start: Ray is coming up in a thread the signal cannot interrupt.
            _wait_for(lambda: "started environment scripted[0]" in log(), PHASE_WITHIN_S, "environment", trainer)
            assert "policy workers ready" not in log()
        elif phase == "training":
            _wait_for(lambda: _has_step(run_dir), PHASE_WITHIN_S, "step 1", trainer)
        else:
            _wait_for(lambda: "policy workers ready" in log(), PHASE_WITHIN_S, "policy workers", trainer)
            waiting_since = time.monotonic()
            _wait_for(lambda: "identical scores" in log(), REASON_WITHIN_S, "starvation reason", trainer)
            assert time.monotonic() - waiting_since < REASON_WITHIN_S
            _wait_for(lambda: "Hint: every answer of a group gets the same score" in log(), 60, "hint", trainer)
        assert trainer.running
        if sig == signal.SIGINT:
            os.killpg(trainer.pid, sig)
        else:
            os.kill(trainer.pid, sig)
        code = wait_exit(trainer, EXIT_WITHIN_S)
        text = log()
        assert code == 128 + sig, f"exit status {code}; {text[-6000:]}"
        assert f"received {sig.name}: stopping everything the run started" in text
        assert "SIGTERM received" not in text, "Ray's crash handler ran instead of ours"
    finally:
        trainer.stop(timeout_s=30)
        # Ray's processes notice their driver's exit on their own, within seconds.
        deadline = time.monotonic() + 15
        while processes_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = {pid: cmdline(pid) for pid in processes_with_marker(marker)}
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, leftovers
    assert not listening(api_port)
    if phase == "waiting":
        lines = [line for line in text.splitlines() if "no batch for" in line]
        assert "the API's queue is empty and the environments drop the groups they score" in lines[0], lines
        assert not (run_dir / "metrics.jsonl").read_text().strip(), "trained on groups that should all be dropped"
