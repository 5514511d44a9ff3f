"""LoraSGLangReplica and the gateway against a live SGLang 0.5.12 on CPU: adapters served hot, by version.

One SGLang server (the tiny random Llama, ``--enable-lora``) serves the module; the tests run in
file order on it: the base model, adapter v1, adapter v2 through the gateway, then v3, which
unloads v1 (after a request with n > 1 used it). Each adapter is a PEFT folder with random
non-zero matrices (a fresh PEFT adapter is the identity, which could not tell base and adapter
apart); the references are transformers' log-probs of the base model and of the base with the
adapter merged in by PEFT.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import live_replica
import pytest

from atropos_verl.serving.gateway import POLICY_VERSION_HEADER, Gateway
from atropos_verl.serving.lora import LoraSGLangReplica, adapter_name
from atropos_verl.serving.replicas import ReplicaSpec
from atropos_verl.serving.replicas.access import TOKEN_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.sglang]

MODEL_NAME = "tiny"
START_TIMEOUT_S = 240.0
LOGPROB_ATOL = 1e-3
# Adapter v1 moved the prompt's log-probs by 0.4 in the live check; the base is far outside the tolerance.
MIN_ADAPTER_SHIFT = 0.05
RANK = 8
REPLICA_TOKEN = "sglang-lora-replica-token-for-tests"


class Live(live_replica.Live):
    replica: LoraSGLangReplica


def make_adapter(model_dir: str, out: Path, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft.save_pretrained(out)
    return str(out)


def merged_logprobs(model_dir: str, adapter: str | None, token_ids: list[int]) -> list[float]:
    """Transformers' log-prob of each token after the first, with ``adapter`` merged into the base by PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, torch.tensor(token_ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: str) -> list[int]:
    return live_replica.prompt_ids_of(tiny_model)


@pytest.fixture(scope="module")
def adapters(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {version: make_adapter(tiny_model, root / f"v{version}", seed=version) for version in (1, 2, 3)}


@pytest.fixture(scope="module")
def live(tiny_model: str, sglang_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    spec = ReplicaSpec(
        model_path=tiny_model,
        served_model_name=MODEL_NAME,
        dtype="float32",
        max_model_len=512,
        access_token=REPLICA_TOKEN,
        env={"HF_HUB_OFFLINE": "1"},
    )
    logs = tmp_path_factory.mktemp("sglang-lora-logs")
    replica = LoraSGLangReplica(
        spec,
        name="sglang-lora-test",
        log_dir=logs,
        python=sglang_python,
        lora_rank=RANK,
        target_modules=["all-linear"],
    )
    yield from live_replica.serve_module(Live, replica, START_TIMEOUT_S, REPLICA_TOKEN, "SGLang (LoRA)")


async def loaded_adapters(live: Live) -> set[str]:
    """The adapters SGLang lists beside the base model in /v1/models."""
    async with live.session.get(f"{live.replica.base_url}/v1/models") as resp:
        assert resp.status == 200
        models = (await resp.json())["data"]
    return {entry["id"] for entry in models if entry.get("parent") == MODEL_NAME}


async def held_request(live: Live, body: dict[str, Any]) -> None:
    async with live.session.post(f"{live.replica.base_url}/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert len(await resp.json()) == len(body["input_ids"]) * body["sampling_params"]["n"]


def test_before_any_adapter_the_replica_serves_the_base_model(live: Live, tiny_model: str, prompt_ids: list[int]):
    assert live.replica.adapter is None
    served = live.run(live.replica.prompt_logprobs(prompt_ids))[1:]
    assert max_diff(served, merged_logprobs(tiny_model, None, prompt_ids)) < LOGPROB_ATOL
    assert live.run(loaded_adapters(live)) == set()


def test_adapter_v1_is_served_as_peft_merges_it(
    live: Live, tiny_model: str, prompt_ids: list[int], adapters: dict[int, str]
):
    live.run(live.replica.load_adapter(adapters[1], 1))
    assert (live.replica.adapter, live.replica.policy_version) == (adapter_name(1), 1)
    assert live.run(live.replica.weight_version()) == "1"
    served = [float(lp) for lp in live.run(live.replica.prompt_logprobs(prompt_ids))[1:]]
    assert max_diff(served, merged_logprobs(tiny_model, adapters[1], prompt_ids)) < LOGPROB_ATOL
    assert max_diff(served, merged_logprobs(tiny_model, None, prompt_ids)) > MIN_ADAPTER_SHIFT


def test_the_gateway_samples_with_the_current_adapter_on_both_routes(
    live: Live, tiny_model: str, prompt_ids: list[int], adapters: dict[int, str]
):
    live.run(live.replica.load_adapter(adapters[2], 2))
    assert live.run(loaded_adapters(live)) == {adapter_name(1), adapter_name(2)}

    async def sample() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        gateway = Gateway(
            [live.replica.base_url],
            model_name=MODEL_NAME,
            backend_headers={TOKEN_HEADER: REPLICA_TOKEN},
            backend_engine="sglang",
            max_model_len=512,
        )
        await gateway.start()
        try:
            # As the service does it: the adapter switches while paused, then the version is resumed.
            await gateway.pause(drain_timeout_s=5.0)
            gateway.serve_adapter(adapter_name(2))
            gateway.resume(2)
            native = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
            openai = {"model": "some/hub-name", "prompt": prompt_ids, "max_tokens": 6, "temperature": 0}
            async with live.session.post(f"{gateway.url}/generate", json={**native, "return_logprob": True}) as resp:
                assert resp.status == 200 and resp.headers[POLICY_VERSION_HEADER] == "2"
                generated = await resp.json()
            async with live.session.post(f"{gateway.url}/v1/completions", json={**openai, "logprobs": 1}) as resp:
                assert resp.status == 200 and resp.headers[POLICY_VERSION_HEADER] == "2"
                completion = await resp.json()
            return generated["meta_info"]["output_token_logprobs"], completion
        finally:
            await gateway.stop()

    native_entries, completion = live.run(sample())
    output_ids = [int(entry[1]) for entry in native_entries]
    expected = merged_logprobs(tiny_model, adapters[2], prompt_ids + output_ids)[len(prompt_ids) - 1 :]
    assert max_diff([float(entry[0]) for entry in native_entries], expected) < LOGPROB_ATOL
    # Greedy both times on the same adapter: the OpenAI route samples the same tokens with the same log-probs.
    assert max_diff(completion["choices"][0]["logprobs"]["token_logprobs"], expected) < LOGPROB_ATOL
    base = merged_logprobs(tiny_model, None, prompt_ids + output_ids)[len(prompt_ids) - 1 :]
    assert max_diff(expected, base) > MIN_ADAPTER_SHIFT


def test_a_third_adapter_unloads_the_oldest(
    live: Live, tiny_model: str, prompt_ids: list[int], adapters: dict[int, str]
):
    # A request with n > 1 on the adapter about to go: SGLang 0.5.12 alone would miscount its uses and
    # block the unload for ever (the launcher corrects the count).
    body = {"input_ids": [prompt_ids, prompt_ids[:5]], "sampling_params": {"max_new_tokens": 4, "n": 4}}
    live.run(held_request(live, {**body, "lora_path": adapter_name(1)}))
    live.run(live.replica.load_adapter(adapters[3], 3), timeout_s=30)
    assert live.run(loaded_adapters(live)) == {adapter_name(2), adapter_name(3)}
    assert live.run(live.replica.weight_version()) == "3"
    served = [float(lp) for lp in live.run(live.replica.prompt_logprobs(prompt_ids))[1:]]
    assert max_diff(served, merged_logprobs(tiny_model, adapters[3], prompt_ids)) < LOGPROB_ATOL
    # Loading the folder of a version it holds again serves it again without a second load.
    live.run(live.replica.load_adapter(adapters[2], 2))
    assert live.replica.adapter == adapter_name(2)
    assert live.run(loaded_adapters(live)) == {adapter_name(2), adapter_name(3)}
