"""Environment command lines: injection order, overrides winning, secrets kept out of logs."""

import sys

from atropos_verl.atropos.environments import env_command, redacted
from atropos_verl.config import EnvSpec


def test_injected_flags_come_first_and_user_args_win():
    spec = EnvSpec(
        name="gsm8k", module="my_envs.gsm8k", args=["--env.group_size", "8", "--openai.server_type", "sglang"]
    )
    cmd = env_command(spec, "http://127.0.0.1:8000", "/models/p", ("http://127.0.0.1:9004", "policy"), None)
    assert cmd[:4] == [sys.executable, "-m", "my_envs.gsm8k", "serve"]
    flags = cmd[4:]
    assert flags[flags.index("--env.rollout_server_url") + 1] == "http://127.0.0.1:8000"
    assert flags[flags.index("--openai.base_url") + 1] == "http://127.0.0.1:9004/v1"
    assert flags[flags.index("--openai.tokenizer_name") + 1] == "/models/p"
    # The user's own server type comes after the injected one, so argument parsing keeps theirs.
    assert cmd[-4:] == ["--env.group_size", "8", "--openai.server_type", "sglang"]


def test_external_engines_inject_no_inference_settings():
    spec = EnvSpec(name="e", script="env.py")
    cmd = env_command(spec, "http://api", "/m", None, None)
    assert cmd[1:3] == ["env.py", "serve"]
    assert not any(arg.startswith("--openai.") for arg in cmd)


def test_api_key_is_redacted_in_logs():
    spec = EnvSpec(name="e", script="env.py")
    cmd = env_command(spec, "http://api", "/m", ("http://gw", "policy"), "s3cret-token")
    assert "s3cret-token" in cmd
    assert "s3cret-token" not in " ".join(redacted(cmd))
