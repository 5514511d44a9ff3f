"""The RL loop with a served engine (vllm or sglang), run as the tests of each engine run it.

The trainer starts the engine's replica and the gateway; unmodified BaseEnv processes
(``tests/envs/parity_env.py``) sample the policy through the gateway, by default two: one with
the engine's own atroposlib server type and one with ``openai``; each saves every group it posts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import REPO, spawn, train_command

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port


@dataclass
class EngineRun:
    metrics: list[dict[str, Any]]
    # Groups each environment posted, by its server type (the engine's name, and "openai").
    groups: dict[str, list[dict[str, Any]]]
    trainer_log: str
    gateway_url: str
    run_dir: Path


def parity_env(server_type: str, api_url: str, gateway_url: str, tiny_model: str, groups_file: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "tests" / "envs" / "parity_env.py"),
        "serve",
        "--env.rollout_server_url",
        api_url,
        "--env.tokenizer_name",
        tiny_model,
        "--env.data_path_to_save_groups",
        str(groups_file),
        "--openai.base_url",
        f"{gateway_url}/v1",
        "--openai.model_name",
        tiny_model,
        "--openai.server_type",
        server_type,
        "--openai.api_key",
        "unused",
    ]


def read_groups(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_with_engine(
    engine: str,
    overrides: list[str],
    api_url: str,
    tiny_model: str,
    tmp_path: Path,
    steps: int,
    server_types: tuple[str, ...] | None = None,
) -> EngineRun:
    """``steps`` steps with ``engine=<engine>`` and ``overrides`` (they win over the settings here).

    One parity environment per server type in ``server_types`` (default: the engine's own and
    ``openai``), each asking for the base model's name as any environment asks for the policy.
    Fails if an environment or the trainer does.
    """
    run_dir = tmp_path / "run"
    gateway_url = f"http://127.0.0.1:{free_port()}"
    trainer = spawn(
        train_command(
            f"engine={engine}",
            f"model.path={tiny_model}",
            f"atropos.api_url={api_url}",
            "atropos.batch_timeout=300",
            "trainer.device=cpu",
            "trainer.batch_size=16",
            "trainer.max_token_len=256",
            f"trainer.total_training_steps={steps}",
            f"trainer.run_dir={run_dir}",
            "trainer.logger=[]",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "actor.dtype=float32",
            "actor.lr=1e-3",
            "engine.dtype=float32",
            "engine.max_model_len=256",
            f"engine.gateway_port={gateway_url.rsplit(':', 1)[1]}",
            "engine.sync_check_threshold=0.001",
            # Hydra applies overrides in order: the last value of a key wins.
            *overrides,
        ),
        tmp_path / "trainer.log",
    )
    server_types = server_types or (engine, "openai")
    envs = [
        spawn(
            parity_env(server_type, api_url, gateway_url, tiny_model, tmp_path / f"{server_type}_groups.jsonl"),
            tmp_path / f"env_{server_type}.log",
        )
        for server_type in server_types
    ]
    try:
        deadline = time.monotonic() + 720
        while trainer.running and time.monotonic() < deadline:
            for env, server_type in zip(envs, server_types):
                assert env.running, (tmp_path / f"env_{server_type}.log").read_text()[-3000:]
            time.sleep(1)
        trainer_log = (tmp_path / "trainer.log").read_text()
        assert trainer.returncode() == 0, trainer_log[-6000:]
    finally:
        for proc in envs + [trainer]:
            proc.stop(timeout_s=60)
    return EngineRun(
        metrics=read_metrics(run_dir / "metrics.jsonl"),
        groups={server_type: read_groups(tmp_path / f"{server_type}_groups.jsonl") for server_type in server_types},
        trainer_log=trainer_log,
        gateway_url=gateway_url,
        run_dir=run_dir,
    )


def assert_every_step_synced(metrics: list[dict[str, Any]], steps: int) -> None:
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        # Every step synced into the replica and the replica then agreed with the trainer.
        assert m["sync/policy_version"] == m["step"]
        assert m["sync/logprob_abs_diff"] < 1e-3
        assert m["sync/bytes"] > 0
        assert m["timing/sync_s"] > 0
        assert m["data/groups_rejected"] == 0


def assert_both_envs_served(run: EngineRun, engine: str) -> None:
    """Both unmodified environments got completions through the gateway."""
    native_groups, openai_groups = run.groups[engine], run.groups["openai"]
    assert native_groups and openai_groups
    for group in native_groups:
        assert len(group["tokens"]) == 4
        for tokens, masks, logprobs in zip(group["tokens"], group["masks"], group["inference_logprobs"]):
            assert len(tokens) == len(masks) == len(logprobs)
            assert any(m != -100 for m in masks)
            assert all(lp <= 0 for lp, m in zip(logprobs, masks) if m != -100)
    for group in openai_groups:
        assert all(any(m != -100 for m in masks) for masks in group["masks"])
    assert "gateway for environments: " + run.gateway_url in run.trainer_log
