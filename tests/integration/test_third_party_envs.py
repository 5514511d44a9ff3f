"""Third-party-style Atropos environments (tests/envs/{digit,think,echo}_env.py), unmodified,
through the launcher with `engine=vllm`, and how environment failures end a run.

* one run trains on groups from all three: a single-`APIServerConfig` env reaching the
  gateway, `tokenize_for_trainer` yielding trainable tokens, `use_wandb=True` by default
  without a wandb login, an evaluation at start, `min_batch_allocation`;
* a typo'd environment flag fails the run at once with the environment's name and
  argparse's message; a missing script fails it before anything starts.
"""

import time
from datetime import datetime

import pytest
from procs import base_overrides, run_to_end, train_command

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration

ENVS = ("digits", "think", "echo")
STEPS = 6
ENV_GROUPS = "data/groups_env_"


def logged_at(log, text):
    """Seconds of the day at which the trainer's log line holding ``text`` was written."""
    line = next(line for line in log.splitlines() if text in line)
    clock = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return clock.hour * 3600 + clock.minute * 60 + clock.second + clock.microsecond / 1e6


@pytest.mark.timeout(900)
def test_unmodified_third_party_environments_train_through_the_launcher(tmp_path):
    run_dir, gateway_port = tmp_path / "run", free_port()
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps=STEPS),
            "engine=vllm",
            f"engine.gateway_port={gateway_port}",
            "data=third_party",
            # Every batch holds groups of all three envs: atroposlib's API forms a batch only once each
            # env with a minimum allocation has its share queued (echo sets 0.25 itself), and an env
            # keeps sampling until its own share is queued, however full the shared queue is.
            # Without this a fast env can fill the shared queue and hold a slower one back for a short run.
            "trainer.batch_size=12",
            *(f"data.envs.{i}.args=[--env.max_batches_offpolicy,1,--env.min_batch_allocation,0.3]" for i in (0, 1)),
            "data.envs.2.args=[--env.max_batches_offpolicy,1]",
            "atropos.batch_timeout=300",
            "engine.dtype=float32",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ),
        tmp_path / "trainer.log",
        timeout=720,
    )
    env_logs = {name: (run_dir / "envs" / f"{name}-0.log").read_text() for name in ENVS}
    assert code == 0, log[-5000:] + "".join(f"\n--- {n}:\n{t[-2000:]}" for n, t in env_logs.items())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["data/groups_rejected"] == 0 for m in metrics)
    # Counted by the trainer, per the id the API gave each environment when it registered:
    # three environments registered, and groups of each of the three ids were trained.
    trained = {key: sum(m.get(key, 0) for m in metrics) for m in metrics for key in m if key.startswith(ENV_GROUPS)}
    assert sorted(trained) == [f"{ENV_GROUPS}{i}" for i in range(len(ENVS))], trained
    assert all(count > 0 for count in trained.values()), trained
    # The single-config env used the gateway it was given, not atroposlib's default ports.
    assert f"base_url='http://127.0.0.1:{gateway_port}/v1'" in env_logs["digits"]
    assert "localhost:9004" not in env_logs["digits"]
    # The evaluation at start ran to its end, and its report reached the trainer's metrics.
    assert "Evaluation completed" in env_logs["echo"]
    assert any(key.startswith("eval/echo/") for m in metrics for key in m), sorted({k for m in metrics for k in m})


@pytest.mark.timeout(300)
def test_a_typo_in_an_environment_flag_fails_the_run_at_once(tmp_path):
    started = time.monotonic()
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps=2),
            'data.envs=[{name: digits, script: tests/envs/digit_env.py, args: ["--env.grup_size", "3"]}]',
            f"trainer.run_dir={tmp_path / 'run'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ),
        tmp_path / "trainer.log",
        timeout=240,
    )
    elapsed = time.monotonic() - started
    assert code not in (0, -1), log[-5000:]
    failure = "environment digits[0] could not start (exit status 2): unrecognized arguments: --env.grup_size 3"
    assert failure in log
    assert "restarting in" not in log
    # Failed at once: the supervisor gave up on the environment within 30 s of starting it.
    assert logged_at(log, failure) - logged_at(log, "started environment digits[0]") < 30
    # The whole run then unwinds; the trainer's policy start-up (Ray) cannot be interrupted.
    assert elapsed < 200, f"took {elapsed:.0f}s"


@pytest.mark.timeout(120)
def test_a_missing_script_fails_before_anything_starts(tmp_path):
    started = time.monotonic()
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps=2),
            "data.envs=[{name: gone, script: tests/envs/no_such_env.py}]",
            f"trainer.run_dir={tmp_path / 'run'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ),
        tmp_path / "trainer.log",
        timeout=100,
    )
    elapsed = time.monotonic() - started
    assert code not in (0, -1), log[-5000:]
    assert "data.envs[0] (gone): script tests/envs/no_such_env.py not found" in log
    assert "started environment" not in log
    assert elapsed < 30, f"took {elapsed:.0f}s"
