"""One command runs everything: API, engines + gateway, supervised environments, trainer.

* the whole system starts from `python -m atropos_verl.train`, survives an environment
  being killed mid-run (it is restarted), and on exit leaves none of its processes and
  no listening ports;
* a run stopped after step k and resumed continues exactly like an uninterrupted run;
* a Hydra multirun sweeps advantage clipping, one directory per run.

The last two are ``slow`` (``make test-slow``, also run by CI): they add ~2.5 min to ``make test``.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from procs import (
    REPO,
    base_overrides,
    cmdline,
    listening,
    processes_with_marker,
    run_to_end,
    spawn,
    train_command,
    train_scripted,
)

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_whole_system_restarts_a_killed_environment_and_stops_cleanly(tmp_path):
    api_port, gateway_port = free_port(), free_port()
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    cmd = train_command(
        *base_overrides(api_port, steps=4),
        "engine=vllm",
        "data=parity",
        # At most one batch queued ahead: the last steps need data from the restarted environment.
        "data.envs.0.args=[--env.max_batches_offpolicy,1]",
        "engine.dtype=float32",
        "engine.max_model_len=256",
        "engine.gpu_memory_utilization=0.4",
        f"engine.gateway_port={gateway_port}",
        f"trainer.run_dir={run_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    log_path = tmp_path / "trainer.log"
    trainer = spawn(cmd, log_path, marker)
    killed = None
    try:
        deadline = time.monotonic() + 720
        while trainer.running and time.monotonic() < deadline:
            metrics_file = run_dir / "metrics.jsonl"
            if killed is None and metrics_file.exists() and metrics_file.read_text().strip():
                envs = [p for p in processes_with_marker(marker) if "parity_env.py" in cmdline(p)]
                assert envs, "the environment process is not running"
                killed = min(envs)
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.5)
        log_text = log_path.read_text()
        assert trainer.returncode() == 0, log_text[-6000:]
        # Nothing the run started outlives it: judged before our clean-up kills the trainer's process group.
        deadline = time.monotonic() + 30
        while processes_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = {pid: cmdline(pid) for pid in processes_with_marker(marker)}
    finally:
        trainer.stop(timeout_s=60)

    assert killed is not None
    assert "environment parity[0] exited with status -9; restarting" in log_text
    assert "restarted environment parity[0]" in log_text
    assert f"started the Atropos API behind http://127.0.0.1:{api_port}" in log_text
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not leftovers, leftovers
    # ... and its ports are closed.
    assert not listening(api_port)
    assert not listening(gateway_port)
    assert (run_dir / "curves.png").stat().st_size > 0


# Three whole runs (~1.5 min on 2 cores): in make test-slow; tests/unit/test_resume.py stays in make test.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    """Same data every step (identical groups): a run stopped after step 2 and resumed must
    reproduce the uninterrupted run's losses at steps 3 and 4, which needs the weights, the
    optimizer's moments and the step counter back."""

    train_scripted(tmp_path, tmp_path / "straight", 4, "straight")
    train_scripted(tmp_path, tmp_path / "resumed", 2, "first-half")
    log = train_scripted(tmp_path, tmp_path / "resumed", 4, "second-half")

    assert "resumed from" in log and "at step 2" in log
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7), (a["step"], a, b)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    # The loss must actually move, or equality would prove nothing.
    assert abs(straight[3]["train/loss"] - straight[1]["train/loss"]) > 1e-3
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "global_step_4" / "trainer_state.json").read_text())
    assert state["step"] == 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multirun_sweeps_advantage_clipping(tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps=2),
            "data=scripted",
            "advantage.clip=[-1.0,1.0],[-3.0,3.0]",
            f"hydra.sweep.dir={sweep_dir}",
            multirun=True,
        ),
        tmp_path / "sweep.log",
        timeout=800,
    )
    assert code == 0, log[-5000:]
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").exists())
    assert len(runs) == 2, list(sweep_dir.iterdir())
    max_advantage = {}
    for run_dir in runs:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2]
        max_advantage[run_dir.name] = metrics[1]["advantage/max"]
    # Step 2 trains an env group whose largest advantage (5.0) is clipped to the sweep's bound.
    assert sorted(max_advantage.values()) == [1.0, 3.0], max_advantage

    table = subprocess.run(
        [sys.executable, "experiments/tabulate.py", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "advantage.clip=[-1.0,1.0]" in table and "advantage.clip=[-3.0,3.0]" in table
