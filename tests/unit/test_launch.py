"""Environment command lines: the compat runner, injection order, run facts, overrides winning,
secrets kept out of argv and logs, preflight, and which exits fail the run at once."""

import asyncio
import sys
import time

import pytest

from atropos_verl.atropos.environments import (
    EnvironmentFailedError,
    EnvLaunch,
    EnvSupervisor,
    env_command,
    env_environ,
    preflight,
    redacted,
    usage_error,
)
from atropos_verl.atropos.run_env import API_KEY_ENV
from atropos_verl.config import DataConfig, EnvSpec, TrainerConfig

RUNNER = [sys.executable, "-m", "atropos_verl.atropos.run_env"]


def flag(cmd, name):
    """The value argument parsing keeps: the last occurrence wins."""
    index = len(cmd) - 1 - cmd[::-1].index(name)
    return cmd[index + 1]


def test_injected_flags_come_first_and_user_args_win():
    spec = EnvSpec(
        name="gsm8k", module="my_envs.gsm8k", args=["--env.group_size", "8", "--openai.server_type", "sglang"]
    )
    cmd = env_command(spec, "http://127.0.0.1:8000", "/models/p", ("http://127.0.0.1:9004", "policy"))
    assert cmd[:6] == [*RUNNER, "-m", "my_envs.gsm8k", "serve"]
    assert flag(cmd, "--env.rollout_server_url") == "http://127.0.0.1:8000"
    assert flag(cmd, "--openai.base_url") == "http://127.0.0.1:9004/v1"
    assert flag(cmd, "--openai.tokenizer_name") == "/models/p"
    # The user's own server type comes after the injected one, so argument parsing keeps theirs.
    assert cmd[-4:] == ["--env.group_size", "8", "--openai.server_type", "sglang"]
    assert flag(cmd, "--openai.server_type") == "sglang"


def test_external_engines_inject_no_inference_settings():
    spec = EnvSpec(name="e", script="env.py")
    cmd = env_command(spec, "http://api", "/m", None)
    assert cmd[3:5] == ["env.py", "serve"]
    assert not any(arg.startswith("--openai.") for arg in cmd)
    assert env_environ(None, "s3cret") is None


def test_run_facts_are_injected_and_group_size_only_when_set():
    trainer = TrainerConfig(total_training_steps=7, max_token_len=300, logger=["console"])
    spec = EnvSpec(name="e", script="env.py", args=["--env.total_steps", "99"])
    cmd = env_command(spec, "http://api", "/m", None, EnvLaunch.for_run(trainer))
    assert flag(cmd, "--env.max_token_length") == "300"
    assert flag(cmd, "--env.use_wandb") == "false"
    assert "--env.wandb_name" not in cmd
    assert "--env.group_size" not in cmd
    # The spec's own value wins over the run's.
    assert flag(cmd, "--env.total_steps") == "99"
    # Otherwise environments run as long as the trainer (which stops them), not 7 batches.
    plain = env_command(EnvSpec(name="e", script="env.py"), "http://api", "/m", None, EnvLaunch.for_run(trainer))
    assert int(flag(plain, "--env.total_steps")) >= 10**9
    assert flag(env_command(spec, "http://api", "/m", None, group_size=4), "--env.group_size") == "4"


def test_environments_sample_one_batch_of_groups_at_once():
    # 256 sequences in groups of 8: 32 groups in flight, not atroposlib's default 8 (four waves per batch).
    trainer = TrainerConfig(batch_size=256)
    cmd = env_command(EnvSpec(name="e", script="env.py"), "http://api", "/m", None, EnvLaunch.for_run(trainer, 8))
    assert flag(cmd, "--env.max_num_workers") == "32"
    # Never below the default; group size unknown (each env's own): the env's own default.
    assert EnvLaunch.for_run(TrainerConfig(batch_size=16), 8).max_num_workers == 8
    assert "--env.max_num_workers" not in env_command(
        EnvSpec(name="e", script="env.py"), "http://api", "/m", None, EnvLaunch.for_run(trainer)
    )
    # An env's own setting wins.
    own = EnvSpec(name="e", script="env.py", args=["--env.max_num_workers", "4"])
    assert (
        flag(env_command(own, "http://api", "/m", None, EnvLaunch.for_run(trainer, 8)), "--env.max_num_workers") == "4"
    )


def test_wandb_is_on_for_environments_only_when_the_run_logs_to_wandb():
    launch = EnvLaunch.for_run(TrainerConfig(logger=["console", "wandb"]))
    cmd = env_command(EnvSpec(name="gsm8k", script="env.py"), "http://api", "/m", None, launch)
    assert flag(cmd, "--env.use_wandb") == "true"
    assert flag(cmd, "--env.wandb_name") == "gsm8k"
    # Without run facts (an older caller) environments still never need a wandb login.
    assert flag(env_command(EnvSpec(name="e", script="env.py"), "http://api", "/m", None), "--env.use_wandb") == "false"


def test_api_key_travels_in_the_environment_not_argv():
    spec = EnvSpec(name="e", script="env.py")
    gateway = ("http://gw", "policy")
    cmd = env_command(spec, "http://api", "/m", gateway)
    assert "--openai.api_key" not in cmd
    assert env_environ(gateway, "s3cret-token")[API_KEY_ENV] == "s3cret-token"
    assert env_environ(gateway, None)[API_KEY_ENV] == "unused"


def test_api_key_given_by_the_user_is_redacted_in_logs():
    cmd = env_command(EnvSpec(name="e", script="env.py", args=["--openai.api_key", "s3cret"]), "http://a", "/m", None)
    assert "s3cret" not in " ".join(redacted(cmd))


def test_preflight_names_the_entry_with_a_missing_script_or_module(tmp_path):
    script = tmp_path / "env.py"
    script.write_text("")
    preflight(DataConfig(envs=[EnvSpec(name="ok", script=str(script)), EnvSpec(name="m", module="json")]))
    with pytest.raises(EnvironmentFailedError, match=r"^data\.envs\[1\] \(gone\): script .*nope\.py not found"):
        preflight(DataConfig(envs=[EnvSpec(name="ok", script=str(script)), EnvSpec(name="gone", script="nope.py")]))
    with pytest.raises(EnvironmentFailedError, match=r"^data\.envs\[0\] \(m\): module no_such_pkg\.env "):
        preflight(DataConfig(envs=[EnvSpec(name="m", module="no_such_pkg.env")]))


ARGPARSE = "usage: env.py [--help] {serve,process,evaluate} ...\nunrecognized arguments: --env.grup_size 3\n"
IMPORT = "Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'datasets'\n"
CRASH = "Traceback (most recent call last):\n  ...\nConnectionError: gateway went away\n"


@pytest.mark.parametrize(
    ("code", "uptime", "log", "expected"),
    [
        (2, 8.0, ARGPARSE, True),
        (1, 8.0, IMPORT, True),
        (2, 3.0, "python: can't open file '/x/env.py': [Errno 2] No such file or directory\n", True),
        # A crash that is not a usage error is restarted, however early.
        (1, 8.0, CRASH, False),
        # After a healthy start even an import error is a crash (e.g. a lazy import in a task).
        (1, 600.0, IMPORT, False),
        # Stopped by a signal: restarted.
        (-9, 5.0, IMPORT, False),
    ],
)
def test_usage_errors_are_told_apart_from_crashes(code, uptime, log, expected):
    assert usage_error(code, uptime, log) is expected


@pytest.mark.timeout(120)
def test_an_environment_that_fails_to_import_fails_the_run_within_30s_with_its_message(tmp_path):
    """A real env process (through the compat runner) whose import fails: the run's task is cancelled, not restarted."""
    script = tmp_path / "broken_env.py"
    script.write_text("import atroposlib\nimport an_env_dependency_not_installed\n")
    supervisor = EnvSupervisor(
        DataConfig(envs=[EnvSpec(name="broken", script=str(script))], max_restarts=3, restart_backoff=0.1),
        tmp_path / "envs",
        poll_interval_s=0.1,
    )

    async def run() -> float:
        started = time.monotonic()
        supervisor.start("http://127.0.0.1:9", "unused-model", None, None)
        try:
            # The supervisor cancels the task that started it, as it cancels a trainer's run.
            with pytest.raises(asyncio.CancelledError):
                await asyncio.sleep(60)
            return time.monotonic() - started
        finally:
            await supervisor.stop()

    elapsed = asyncio.run(run())
    assert elapsed < 30, f"took {elapsed:.0f}s"
    assert supervisor.failure.startswith(
        "environment broken[0] could not start (exit status 1): "
        "ModuleNotFoundError: No module named 'an_env_dependency_not_installed'"
    ), supervisor.failure
    assert len(supervisor.processes) == 1 and supervisor.processes[0].consecutive_restarts == 0
