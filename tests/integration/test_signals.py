"""SIGTERM, SIGINT and SIGHUP stop a run from any phase: exit status 128 + signal number, nothing left.

Each case runs the real trainer (tiny model on CPU, real run-api, the scripted BaseEnv,
Ray and verl workers) and signals it during start-up (while the policy workers start),
while training (after step 1), while it saves a checkpoint, while it syncs weights into
vLLM-CPU replicas behind the gateway (``slow``), or while it waits for data; SIGINT goes
to the whole process group, as a terminal's Ctrl-C does. The waiting case runs an
environment whose groups all score the same, so the trainer must also say why no batch
forms.

Nothing may be left, judged before the test's own clean-up: no process of the run (its
descendants when the signal went, and anything carrying the run's marker, Ray's included)
and no listener, on any address, on a port one of them listened on.
"""

import contextlib
import os
import signal
import time
import uuid

import pytest
from procs import (
    alive,
    base_overrides,
    cmdline,
    listeners_on,
    listening_ports,
    processes_with_marker,
    run_tree,
    spawn,
    train_command,
    wait_exit,
)

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
EXIT_WITHIN_S = 60
# Ray's workers notice their driver is gone within seconds; with 15 s the training case failed once on this
# 2-core VM under a second test run's load, after the trainer had exited on the signal in 2 s. A process that
# stays, stays: the bound only waits.
LEFTOVERS_WITHIN_S = 45
PHASE_WITHIN_S = 150
# The first "why no batch" line comes 15 s into a wait; the issue asks for one within 60 s.
REASON_WITHIN_S = 60
HINT_AFTER_S = 10


def _wait_for(condition, timeout_s: float, what: str, trainer, poll_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert trainer.running, f"the trainer exited before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s"
        time.sleep(poll_s)


def _has_step(run_dir) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and bool(path.read_text().strip()) and read_metrics(path)[0]["step"] == 1


def _case(phase, sig, *marks):
    return pytest.param(phase, sig, id=f"{phase}-{sig.name}", marks=marks)


CASES = [
    _case("startup", signal.SIGINT),
    _case("startup", signal.SIGTERM),
    _case("training", signal.SIGTERM),
    _case("checkpoint", signal.SIGTERM),
    # With vLLM-CPU replicas and the gateway (~1.5 min more to start): in make test-slow.
    _case("sync", signal.SIGTERM, pytest.mark.slow),
    _case("waiting", signal.SIGTERM),
    # make test sends SIGINT at start-up and SIGHUP while waiting; this one runs in make test-slow.
    _case("waiting", signal.SIGINT, pytest.mark.slow),
    _case("waiting", signal.SIGHUP),
]
VLLM = ["engine=vllm", "engine.dtype=float32", "engine.max_model_len=256", "engine.gpu_memory_utilization=0.4"]


def _gateway_lines(text: str) -> list[str]:
    """The gateway's pause/resume lines: it is paused from the start of a step's training to the end of its sync."""
    return [line for line in text.splitlines() if "gateway paused at" in line or "gateway resumed at" in line]


def _syncing_after_step_1(log) -> bool:
    lines = _gateway_lines(log())
    return bool(lines) and "gateway paused at policy version 1" in lines[-1]


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("phase", "sig"), CASES)
def test_signal_stops_everything(tmp_path, phase, sig):
    api_port = free_port()
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    pattern = "equal" if phase == "waiting" else "score"
    overrides = base_overrides(api_port, steps=1000)
    if phase in ("checkpoint", "sync"):
        # The tiny model saves or syncs in ~0.1 s, too short a window to hit; SmolLM2-135M takes seconds.
        overrides = [o for o in overrides if not o.startswith("model.path=")]
        overrides.append("model.path=builtin:smollm2-135m-instruct")
    cmd = train_command(
        *overrides,
        "data=scripted",
        f"data.envs.0.args=[--env.pattern,{pattern}]",
        f"atropos.starvation_hint_after={HINT_AFTER_S}",
        *(VLLM + [f"engine.gateway_port={free_port()}"] if phase == "sync" else []),
        *(["trainer.save_freq=1"] if phase == "checkpoint" else []),
        f"trainer.run_dir={run_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    log_path = tmp_path / "trainer.log"
    trainer = spawn(cmd, log_path, marker)
    tree = []
    try:
        log = log_path.read_text
        if phase == "startup":
            # Sent while the policy workers start: Ray is coming up in a thread the signal cannot interrupt.
            _wait_for(lambda: "started environment scripted[0]" in log(), PHASE_WITHIN_S, "environment", trainer)
            assert "policy workers ready" not in log()
        elif phase == "training":
            _wait_for(lambda: _has_step(run_dir), PHASE_WITHIN_S, "step 1", trainer)
        elif phase == "checkpoint":
            # The step's folder appears when its save begins; the save is committed last.
            step_dir = run_dir / "checkpoints" / "global_step_1"
            _wait_for(step_dir.exists, PHASE_WITHIN_S, "checkpoint at step 1", trainer, poll_s=0.02)
        elif phase == "sync":
            _wait_for(lambda: _syncing_after_step_1(log), PHASE_WITHIN_S + 120, "step 2", trainer, poll_s=0.02)
        else:
            _wait_for(lambda: "policy workers ready" in log(), PHASE_WITHIN_S, "policy workers", trainer)
            waiting_since = time.monotonic()
            _wait_for(lambda: "identical scores" in log(), REASON_WITHIN_S, "starvation reason", trainer)
            assert time.monotonic() - waiting_since < REASON_WITHIN_S
            _wait_for(lambda: "Hint: every answer of a group gets the same score" in log(), 60, "hint", trainer)
        assert trainer.running
        # What the run holds the moment the signal goes: every process (Ray's included) and every port
        # any of them listens on, on any address.
        tree = run_tree(trainer.pid, marker)
        ports = listening_ports(tree)
        assert api_port in ports, ports
        # None beyond loopback (`ss -ltnp` during a run), Ray's servers included.
        outside = {port: holder for port, holder in ports.items() if holder.split()[0] not in LOOPBACK}
        assert not outside, outside
        if phase != "startup":
            # Ray is up: its GCS's gRPC port is among those checked afterwards.
            assert any("gcs_server" in holder for holder in ports.values()), ports
        if sig == signal.SIGINT:
            os.killpg(trainer.pid, sig)
        else:
            os.kill(trainer.pid, sig)
        code = wait_exit(trainer, EXIT_WITHIN_S)
        text = log()
        # Judged before the test's own clean-up, which kills the trainer's process group: what the run
        # itself left. Ray's processes notice their driver's exit on their own, within seconds.
        deadline = time.monotonic() + LEFTOVERS_WITHIN_S
        while (alive(tree) or processes_with_marker(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = {**alive(tree), **{pid: cmdline(pid) for pid in processes_with_marker(marker)}}
        still_listening = listeners_on(ports)
    finally:
        everything = [*tree, *(run_tree(trainer.pid, marker) if trainer.running else [])]
        trainer.stop(timeout_s=30)
        # A trainer killed mid-stop orphans vLLM's engine core, whose retitling hides the marker: by tree too.
        for pid in {*alive(everything), *processes_with_marker(marker)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 128 + sig, f"exit status {code}; {text[-6000:]}"
    assert f"received {sig.name}: stopping everything the run started" in text
    assert "SIGTERM received" not in text, "Ray's crash handler ran instead of ours"
    assert not leftovers, leftovers
    assert not still_listening, {port: (ports[port], now) for port, now in still_listening.items()}
    if phase == "sync":
        # The signal came while the gateway was paused for step 2's training and sync.
        before = _gateway_lines(text[: text.index(f"received {sig.name}")])
        assert "gateway paused at policy version 1" in before[-1], before[-3:]
    if phase == "checkpoint":
        # The signal came while the checkpoint was being saved: it finishes, but is committed after the signal or never.
        saved = text.find("checkpoint saved at step 1")
        assert saved == -1 or saved > text.index(f"received {sig.name}"), text[-4000:]
    if phase == "waiting":
        lines = [line for line in text.splitlines() if "no batch for" in line]
        assert "the API's queue is empty and the environments drop the groups they score" in lines[0], lines
        assert not (run_dir / "metrics.jsonl").read_text().strip(), "trained on groups that should all be dropped"
