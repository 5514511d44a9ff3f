"""actor.dtype=bfloat16 is refused on the CPU, where the device is known: at the trainer's start."""

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from atropos_verl.config import ActorConfig, ConfigError, RunConfig, TrainerConfig, check_device, compute_dtype
from atropos_verl.trainer import Trainer


def run_config(dtype: str, device: str, run_dir: Path | str = ".") -> RunConfig:
    trainer = dataclasses.replace(TrainerConfig(), device=device, run_dir=str(run_dir))
    return RunConfig(actor=ActorConfig(dtype=dtype), trainer=trainer)


def test_bfloat16_on_cpu_names_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        check_device(run_config("bfloat16", "cpu"), "cpu")
    assert str(err.value).startswith("actor.dtype: bfloat16 is not supported on the CPU")
    assert "set actor.dtype=float32" in str(err.value)


def test_float32_on_cpu_and_bfloat16_on_cuda_pass_and_auto_picks_per_device():
    check_device(run_config("float32", "cpu"), "cpu")
    check_device(run_config("bfloat16", "cuda"), "cuda")
    check_device(run_config("auto", "cpu"), "cpu")
    assert compute_dtype(ActorConfig(dtype="auto"), "cpu") == "float32"
    assert compute_dtype(ActorConfig(dtype="auto"), "cuda") == "bfloat16"
    assert compute_dtype(ActorConfig(dtype="bfloat16"), "cuda") == "bfloat16"


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "auto", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto resolves to cpu only without CUDA")
        ),
    ],
)
def test_trainer_refuses_before_starting_anything(tmp_path: Path, device: str):
    cfg = run_config("bfloat16", device, tmp_path / "run")
    with pytest.raises(ConfigError, match="actor.dtype=float32"):
        asyncio.run(Trainer(cfg).run())
    # No API, environment or metrics file was started or written.
    assert not (tmp_path / "run").exists()
