"""Start-up checks: each mistake fails before anything starts, in one line naming the key and the fix.

The in-process tests call :func:`preflight` on typed configs; the CLI tests run
``python -m atropos_verl.train`` and assert it exits 2 within seconds with that line.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atropos_verl.config import ConfigError, DataConfig, EngineConfig, EnvSpec, RunConfig, TrainerConfig
from atropos_verl.preflight import BUILTIN_GROUP_SIZES, fills, preflight

REPO = Path(__file__).resolve().parents[2]
ARITHMETIC = EnvSpec(name="arithmetic", module="atropos_verl.envs.arithmetic")


def config(tmp_path, batch_size=8, envs=(), engine=None, data=None, **trainer):
    return RunConfig(
        trainer=TrainerConfig(run_dir=str(tmp_path / "run"), batch_size=batch_size, **trainer),
        data=data or DataConfig(envs=list(envs)),
        engine=engine or EngineConfig(),
    )


@pytest.fixture
def listener():
    """A port something listens on (and never answers HTTP)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_sound_config_passes(tmp_path, tiny_model):
    preflight(config(tmp_path, envs=[ARITHMETIC]))
    assert (tmp_path / "run").is_dir()


def test_an_unwritable_run_dir_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = config(tmp_path)
    cfg.trainer.run_dir = str(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match=r"^trainer\.run_dir: cannot write to .*file/run .*writable folder"):
        preflight(cfg)


def test_a_missing_env_script_or_module_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.envs\[1\] \(gone\): script nope\.py not found .*path of the"):
        preflight(config(tmp_path, envs=[ARITHMETIC, EnvSpec(name="gone", script="nope.py")]))
    with pytest.raises(ConfigError, match=r"^data\.envs\[0\] \(m\): module no_such\.env is not importable; install"):
        preflight(config(tmp_path, envs=[EnvSpec(name="m", module="no_such.env")]))


@pytest.mark.parametrize(
    "args, batch_size, source",
    [
        (["--env.group_size", "6"], 8, r"6 \(--env\.group_size in data\.envs\[0\]\.args\)"),
        ({"env": {"group_size": 3}}, 8, r"3 \(--env\.group_size in data\.envs\[0\]\.args\)"),
        ([], 12, r"8 \(the default of atropos_verl\.envs\.arithmetic\)"),
        ([], 4, r"8 \(the default of atropos_verl\.envs\.arithmetic\)"),
    ],
)
def test_a_group_size_that_cannot_fill_the_batch_is_named(tmp_path, args, batch_size, source):
    env = EnvSpec(name="arithmetic", module="atropos_verl.envs.arithmetic", args=args)
    with pytest.raises(
        ConfigError,
        match=rf"^trainer\.batch_size: {batch_size} sequences per step cannot be made of whole groups "
        rf"\(environment 'arithmetic': {source}\), so no batch would ever form; set trainer\.batch_size",
    ):
        preflight(config(tmp_path, batch_size=batch_size, envs=[env]))


def test_group_sizes_that_fill_the_batch_pass(tmp_path, tiny_model):
    four = EnvSpec(name="a", module="atropos_verl.envs.arithmetic", args={"env.group_size": 4})
    six = EnvSpec(name="b", module="atropos_verl.envs.arithmetic", args=["--env.group_size=6"])
    preflight(config(tmp_path, batch_size=10, envs=[four, six]))
    # data.group_size is injected into every environment; a spec's own flag wins over it.
    preflight(config(tmp_path, batch_size=6, data=DataConfig(envs=[ARITHMETIC], group_size=3)))
    # A third-party environment's default size is unknown until it runs: not refused.
    preflight(config(tmp_path, batch_size=7, envs=[EnvSpec(name="own", module="json")]))


def test_fills_counts_whole_groups():
    assert fills(16, {8}) and fills(10, {4, 6}) and fills(7, {2, 3})
    assert not fills(12, {8}) and not fills(4, {8}) and not fills(7, {2, 4})


def test_builtin_group_sizes_are_the_environments_own():
    from atropos_verl.envs.arithmetic import ArithmeticEnv

    assert BUILTIN_GROUP_SIZES["atropos_verl.envs.arithmetic"] == ArithmeticEnv.config_init()[0].group_size


def test_a_taken_gateway_port_is_named(tmp_path, listener):
    engine = EngineConfig(kind="vllm", gateway_port=listener)
    with pytest.raises(ConfigError, match=rf"^engine\.gateway_port: port {listener} on 127\.0\.0\.1 is already in use"):
        preflight(config(tmp_path, engine=engine))
    engine = EngineConfig(kind="vllm", gateway_extra_ports=[listener])
    with pytest.raises(ConfigError, match=rf"^engine\.gateway_extra_ports: port {listener} .* already in use"):
        preflight(config(tmp_path, engine=engine))


def test_an_api_port_taken_by_something_else_is_named(tmp_path, listener):
    cfg = config(tmp_path)
    cfg.atropos.api_url = f"http://127.0.0.1:{listener}"
    with pytest.raises(ConfigError, match=rf"^atropos\.api_url: port {listener} is in use by something that is not"):
        preflight(cfg)
    cfg.atropos.start_api = "always"
    with pytest.raises(ConfigError, match=r"^atropos\.api_url: .* already in use and atropos\.start_api=always"):
        preflight(cfg)


def test_a_running_api_is_used_not_refused(tmp_path, atropos_api, tiny_model):
    cfg = config(tmp_path)
    cfg.atropos.api_url = atropos_api.url
    preflight(cfg)


def test_cuda_without_a_gpu_is_named(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"^trainer\.device: cuda, but torch sees no CUDA GPU here; set trainer\."):
        preflight(config(tmp_path, device="cuda"))


def test_more_gpus_than_present_are_named(tmp_path, monkeypatch):
    import torch

    # The count is what torch reports; this machine's own may be zero.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(
        ConfigError, match=r"^trainer\.n_gpus_per_node: 4 GPUs asked for, 2 visible \(0, 1\); set trainer\."
    ):
        preflight(config(tmp_path, device="cuda", n_gpus_per_node=4))


def test_replicas_that_do_not_fit_the_gpus_are_named(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = EngineConfig(kind="vllm", replicas=3)
    with pytest.raises(ConfigError, match=r"^engine\.replicas x engine\.tensor_parallel_size: 3 x 1 GPUs do not fit"):
        preflight(config(tmp_path, engine=engine, device="cuda", n_gpus_per_node=2))


def test_an_unloadable_model_is_named(tmp_path):
    cfg = config(tmp_path)
    cfg.model.path = str(tmp_path / "no-model")
    with pytest.raises(ConfigError, match=r"^model\.path: cannot load the model's config from .*no-model.*set model"):
        preflight(cfg)


def test_lengths_beyond_the_models_positions_are_named(tmp_path, tiny_model):
    cfg = config(tmp_path, max_token_len=4096)
    cfg.actor.max_token_len_per_gpu = 8192
    with pytest.raises(ConfigError, match=r"^trainer\.max_token_len: 4096 exceeds the model's 2048 positions"):
        preflight(cfg)
    cfg = config(tmp_path, engine=EngineConfig(kind="vllm", max_model_len=3000))
    with pytest.raises(ConfigError, match=r"^engine\.max_model_len: 3000 exceeds the model's 2048 positions"):
        preflight(cfg)


def train(*overrides, cwd=REPO):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "atropos_verl.train", *overrides, "trainer.progress_bar=false"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stderr, time.monotonic() - started


def test_the_command_line_fails_in_seconds_with_the_line(tmp_path, listener):
    hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
    for overrides, line in [
        (["trainer.batch_size=12"], "configuration error: trainer.batch_size: 12 sequences per step cannot be made"),
        (
            ["data=atropos", "+data.envs=[{name:own,script:missing_env.py}]"],
            "configuration error: data.envs[0] (own): script missing_env.py not found",
        ),
        (
            ["engine=vllm", f"engine.gateway_port={listener}"],
            f"configuration error: engine.gateway_port: port {listener} on 127.0.0.1 is already in use",
        ),
    ]:
        code, stderr, took = train(*overrides, hydra_dir)
        assert code == 2 and line in stderr, stderr
        # Nothing was started: the check ran before the API, gateway, environments or workers.
        assert took < 60 and "started" not in stderr, (took, stderr)
