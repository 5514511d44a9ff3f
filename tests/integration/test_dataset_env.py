"""Datasets as Atropos environments against the real system (tiny model, vLLM on CPU).

* Two dataset environments, one reading a verl-format parquet file and sampling through
  ``ManagedServer`` (server type vllm), one reading plain GSM8K JSON Lines and sampling
  plain completions (server type openai), run against a real ``run-api`` and the
  trainer's gateway in front of vLLM; this test registers as the trainer and reads the
  batches the API hands out: every group has its prompt masked and its answer trained,
  scores equal to verl's gsm8k reward of the answer text, and correct/formatted metrics;
  over-long and bad rows are skipped and counted in the environment's log; the parquet
  environment evaluates greedily on held-out data when the step crosses steps_per_eval.
* ``python -m atropos_verl.train data=gsm8k data.path=<jsonl>`` trains two steps end to
  end with the environment the data group starts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from procs import base_overrides, run_to_end, spawn, train_command

from atropos_verl.atropos import AtroposClient, TrainerRegistration
from atropos_verl.data.sources import render_prompt
from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port
from atropos_verl.procs import ChildProcess
from atropos_verl.serving.gateway import Gateway
from atropos_verl.serving.replicas.base import ReplicaSpec
from atropos_verl.serving.replicas.vllm import VLLMReplica

pytestmark = pytest.mark.integration

GROUP_SIZE = 4
BATCH_SIZE = 8
MAX_TOKEN_LEN = 128
MAX_PROMPT_LENGTH = 72
MAX_RESPONSE_LENGTH = 24
INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    ("A box holds 12 eggs. How many eggs are in 2 boxes?", "24"),
    ("Sara reads 5 pages a day. How many pages in 3 days?", "15"),
    ("A bus has 20 seats and 6 are empty. How many are taken?", "14"),
]
LONG_QUESTION = "Count the words in this sentence please. " * 20


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A verl parquet (plus an over-long prompt and a row without ground truth) and plain GSM8K JSON Lines."""
    verl_rows = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": question + INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": "train", "index": i},
        }
        for i, (question, truth) in enumerate([*QUESTIONS, (LONG_QUESTION, "1"), ("No ground truth here.", "")])
    ]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows), parquet)
    jsonl = tmp_path / "gsm8k.jsonl"
    plain = [{"question": q, "answer": f"Working.\n#### {t}"} for q, t in QUESTIONS]
    plain += [{"question": LONG_QUESTION, "answer": "#### 1"}, {"question": "What?", "answer": "no number"}]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in plain) + "{not json\n")
    return parquet, jsonl


def env_command(
    source: Path, server_type: str, api_url: str, gateway_url: str, model: str, tmp_path: Path, *extra: str
) -> list[str]:
    name = f"{source.suffix[1:]}-{server_type}"
    return [
        sys.executable, "-m", "atropos_verl.envs.dataset", "serve",
        "--env.rollout_server_url", api_url, "--env.tokenizer_name", model,
        "--openai.base_url", f"{gateway_url}/v1", "--openai.model_name", model, "--openai.tokenizer_name", model,
        "--openai.server_type", server_type, "--openai.api_key", "unused",
        "--env.wandb_name", name, "--env.source", str(source), "--env.data_source", "openai/gsm8k",
        "--env.group_size", str(GROUP_SIZE), "--env.max_prompt_length", str(MAX_PROMPT_LENGTH),
        "--env.max_response_length", str(MAX_RESPONSE_LENGTH), "--env.max_batches_offpolicy", "2",
        "--env.data_path_to_save_groups", str(tmp_path / f"{name}-groups.jsonl"), *extra,
    ]  # fmt: skip


def start(cmd: list[str], log_path: Path) -> ChildProcess:
    return spawn(cmd, log_path)


def stop(proc: ChildProcess) -> None:
    proc.stop(timeout_s=30)


def check_group(
    group: dict[str, Any], prompts: dict[tuple[int, ...], str], tokenizer: Any, with_logprobs: bool
) -> None:
    """Prompt tokens masked, answer tokens trained, scores = verl's gsm8k reward of the answer text."""
    from verl.utils.reward_score import default_compute_score

    assert len(group["tokens"]) == len(group["masks"]) == len(group["scores"]) == GROUP_SIZE
    prompt_ids = next((ids for ids in prompts if tuple(group["tokens"][0][: len(ids)]) == ids), None)
    assert prompt_ids is not None, "the group does not start with any of the dataset's prompts"
    truth, n = prompts[prompt_ids], len(prompt_ids)
    correct = []
    for i, (tokens, masks, score) in enumerate(zip(group["tokens"], group["masks"], group["scores"])):
        assert tuple(tokens[:n]) == prompt_ids and masks[:n] == [-100] * n
        assert masks[n:] == tokens[n:] and len(tokens) > n
        if with_logprobs:
            # Exact sampled tokens: at most max_response_length of them.
            assert len(tokens) - n <= MAX_RESPONSE_LENGTH
        answer = tokenizer.decode(tokens[n:], skip_special_tokens=True)
        assert score == default_compute_score("openai/gsm8k", answer, truth)
        correct.append(score >= 1.0)
        if with_logprobs:
            logprobs = group["inference_logprobs"][i]
            assert len(logprobs) == len(tokens) and all(lp <= 0 for lp in logprobs[n:])
    metrics = group["group_overrides"]["metrics"]
    assert metrics["correct"] == sum(correct) / GROUP_SIZE and 0 <= metrics["formatted"] <= 1
    assert group["generation_params"] == {"temperature": 1.0}


async def collect_batches(
    api_url: str, want_envs: int, evals_file: Path, procs: list[ChildProcess], deadline_s: float
) -> list[dict]:
    """Register as the trainer and pull batches until every environment has been seen and the eval has run."""
    registration = TrainerRegistration(
        wandb_group="test", wandb_project="test", batch_size=BATCH_SIZE, max_token_len=MAX_TOKEN_LEN,
        checkpoint_dir="", save_checkpoint_interval=-1, starting_step=0, num_steps=1000,
    )  # fmt: skip
    groups: list[dict] = []
    async with AtroposClient(api_url, registration) as client:
        await client.register()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            assert all(p.running for p in procs), "an environment exited"
            batch = await client.get_batch()
            if batch:
                groups.extend(batch)
            if len({g["env_id"] for g in groups}) >= want_envs and evals_file.exists():
                return groups
            await asyncio.sleep(0.5)
    envs = sorted({g["env_id"] for g in groups})
    raise AssertionError(
        f"after {deadline_s}s: {len(groups)} groups from envs {envs}, eval written: {evals_file.exists()}"
    )


# ~1.7 min on 2 cores: in make test-slow (CI); the data=gsm8k run below keeps the dataset env in make test.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parquet_and_jsonl_envs_send_scored_groups_through_the_api(atropos_api, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    parquet, jsonl = write_inputs(tmp_path)
    chat_prompts = {
        tuple(render_prompt(tokenizer, [{"role": "user", "content": q + INSTRUCTION}], "chat").token_ids): t
        for q, t in QUESTIONS
    }
    plain_prompts = {
        tuple(render_prompt(tokenizer, [{"role": "user", "content": q + INSTRUCTION}], "plain").token_ids): t
        for q, t in QUESTIONS
    }
    evals = tmp_path / "evals"

    async def scenario() -> list[dict]:
        replica = VLLMReplica(
            ReplicaSpec(model_path=tiny_model, served_model_name=tiny_model, dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.4),
            log_dir=tmp_path,
        )  # fmt: skip
        gateway = Gateway([], model_name=tiny_model)
        await gateway.start()
        envs = [
            start(env_command(parquet, "vllm", atropos_api.url, gateway.url, tiny_model, tmp_path,
                              "--env.eval_source", str(parquet), "--env.eval_max_prompts", "2",
                              "--env.steps_per_eval", "2", "--env.data_dir_to_save_evals", str(evals)),
                  tmp_path / "env-parquet.log"),
            start(env_command(jsonl, "openai", atropos_api.url, gateway.url, tiny_model, tmp_path,
                              "--env.prompt_format", "plain"),
                  tmp_path / "env-jsonl.log"),
        ]  # fmt: skip
        try:
            await replica.start(timeout_s=300)
            gateway.set_backends([replica.base_url])
            return await collect_batches(atropos_api.url, 2, evals / "metrics.json", envs, deadline_s=240)
        finally:
            for env in envs:
                stop(env)
            await gateway.stop()
            await replica.stop()

    try:
        groups = asyncio.run(scenario())
    except BaseException:
        for log in ("env-parquet.log", "env-jsonl.log"):
            print(f"--- {log}\n" + (tmp_path / log).read_text()[-4000:])
        raise

    saved = {name: [json.loads(line) for line in (tmp_path / f"{name}-groups.jsonl").read_text().splitlines()]
             for name in ("parquet-vllm", "jsonl-openai")}  # fmt: skip
    # The parquet env's groups carry the sampler's log-probs; the text-only env's do not.
    by_env: dict[Any, list[dict]] = {}
    for group in groups:
        by_env.setdefault(group["env_id"], []).append(group)
    assert len(by_env) == 2
    for env_groups in by_env.values():
        managed = env_groups[0].get("inference_logprobs") is not None
        for group in env_groups:
            check_group(group, chat_prompts if managed else plain_prompts, tokenizer, with_logprobs=managed)
    assert {bool(g[0].get("inference_logprobs")) for g in by_env.values()} == {True, False}
    assert saved["parquet-vllm"] and saved["jsonl-openai"]

    parquet_log = (tmp_path / "env-parquet.log").read_text()
    jsonl_log = (tmp_path / "env-jsonl.log").read_text()
    assert "4 prompts from 6 of its 6 rows; skipped 2 rows (" in parquet_log
    assert "prompt too long 1" in parquet_log and "bad ground truth 1" in parquet_log
    assert f"> max_prompt_length {MAX_PROMPT_LENGTH}" in parquet_log
    assert "4 prompts from 7 of its 7 rows; skipped 3 rows (" in jsonl_log
    assert "prompt too long 1" in jsonl_log and "bad ground truth 1" in jsonl_log and "unreadable 1" in jsonl_log
    # The held-out evaluation ran greedily and was logged and saved.
    assert "eval at step" in parquet_log and "on 2 prompts (greedy)" in parquet_log
    results = json.loads((evals / "metrics.json").read_text())["results"]["all"]
    assert results["eval/prompts"] == 2.0 and 0 <= results["eval/correct"] <= 1
    assert len((evals / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.timeout(900)
def test_train_two_steps_on_a_gsm8k_jsonl_with_the_data_group(tmp_path):
    _, jsonl = write_inputs(tmp_path)
    run_dir = tmp_path / "run"
    code, log = run_to_end(
        train_command(
            *base_overrides(free_port(), steps=2),
            "engine=vllm",
            "data=gsm8k",
            f"data.path={jsonl}",
            f"data.group_size={GROUP_SIZE}",
            f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
            f"data.max_response_length={MAX_RESPONSE_LENGTH}",
            "engine.dtype=float32",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            f"engine.gateway_port={free_port()}",
            "atropos.batch_timeout=300",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ),
        tmp_path / "trainer.log",
        timeout=800,
    )
    assert code == 0, log[-6000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["data/groups_rejected"] == 0
        # The env's per-group metrics reached the trainer.
        assert 0 <= m["env/correct"] <= m["env/formatted"] <= 1
    env_log = (run_dir / "envs" / "gsm8k-0.log").read_text()
    assert "4 prompts from 7 of its 7 rows; skipped 3 rows (" in env_log
    assert "prompt too long 1" in env_log
