"""``model.lora``: composed from the command line, validated at start-up, translated to verl's names."""

import pytest
from test_config import composed

from atropos_verl.config import ConfigError, load_config
from atropos_verl.policy.verl_config import training_worker_config
from atropos_verl.serving.lora import LoraSGLangReplica, LoraVLLMReplica, vllm_max_lora_rank
from atropos_verl.serving.replicas import ReplicaSpec


def test_lora_is_off_by_default_and_full_fine_tuning_keeps_verls_defaults(tiny_model):
    run = load_config(composed())
    assert not run.model.lora.enabled
    worker = training_worker_config(run, tiny_model, "cpu")
    assert worker.model_config.lora_rank == 0
    assert worker.model_config.lora == {}
    assert worker.checkpoint_config.save_lora_only is False


def test_lora_keys_reach_verl_under_its_names(tiny_model):
    run = load_config(
        composed(
            "engine=vllm",
            "model.lora.rank=16",
            "model.lora.alpha=32",
            "model.lora.dropout=0.1",
            "model.lora.target_modules=[q_proj,v_proj]",
        )
    )
    worker = training_worker_config(run, tiny_model, "cpu")
    model = worker.model_config
    assert (model.lora_rank, model.lora_alpha, model.target_modules) == (16, 32, ["q_proj", "v_proj"])
    assert model.lora == {"dropout": 0.1}
    assert worker.checkpoint_config.save_lora_only is True
    # all-linear is PEFT's own keyword, passed as the plain string it expects.
    run = load_config(composed("model.lora.rank=8"))
    assert training_worker_config(run, tiny_model, "cpu").model_config.target_modules == "all-linear"


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["model.lora.rank=-1"], "model.lora.rank", ">= 0"),
        (["model.lora.rank=1024"], "model.lora.rank", "<= 512"),
        (["model.lora.rank=8", "model.lora.alpha=0"], "model.lora.alpha", "> 0"),
        (["model.lora.rank=8", "model.lora.dropout=1.0"], "model.lora.dropout", "< 1"),
        (["model.lora.rank=8", "model.lora.target_modules=[]"], "model.lora.target_modules", "must not be empty"),
        (
            ["model.lora.rank=8", "model.lora.target_modules=[all-linear,q_proj]"],
            "model.lora.target_modules",
            "all-linear stands alone",
        ),
        (
            ["model.lora.rank=8", "engine=vllm", "engine.weight_transport=shared_memory"],
            "engine.weight_transport",
            "use auto or folder",
        ),
        (
            ["model.lora.rank=8", "engine=sglang", "engine.weight_transport=nccl"],
            "engine.weight_transport",
            "use auto or folder",
        ),
    ],
)
def test_bad_lora_settings_are_refused_naming_the_key_and_the_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as caught:
        load_config(composed(*overrides))
    assert str(caught.value).startswith(f"{key}:")
    assert fix in str(caught.value)


def test_an_unknown_lora_key_is_refused():
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(composed("+model.lora.lora_rank=8"))


def test_replicas_reserve_the_smallest_rank_vllm_accepts():
    assert [vllm_max_lora_rank(rank) for rank in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]


def test_lora_flags_come_before_the_users_extra_args():
    spec = ReplicaSpec(model_path="/models/base", served_model_name="base", extra_args=["--max-loras", "4"])
    replica = LoraVLLMReplica(spec, lora_rank=12)
    command = replica.command(8000)
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert "--enable-lora" in command
    # The user's --max-loras comes last, so vLLM's parser keeps it.
    assert command[-2:] == ["--max-loras", "4"]
    assert replica.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    # Before any adapter is loaded the replica's requests name the base model.
    assert replica.request_model_name == "base"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_both_engines_serve_a_lora_policy_synced_as_a_folder(engine):
    run = load_config(composed("model.lora.rank=8", f"engine={engine}", "engine.weight_transport=folder"))
    assert (run.engine.kind, run.model.lora.rank) == (engine, 8)


@pytest.mark.parametrize(
    "target_modules, sglang_modules", [(["all-linear"], ["all"]), (["q_proj", "v_proj"], ["q_proj", "v_proj"])]
)
def test_sglang_lora_flags_name_the_rank_and_modules_before_the_users_extra_args(
    monkeypatch, target_modules, sglang_modules
):
    monkeypatch.setattr(LoraSGLangReplica, "on_cuda", False)
    spec = ReplicaSpec(model_path="/models/base", served_model_name="base", extra_args=["--max-loras-per-batch", "4"])
    replica = LoraSGLangReplica(spec, python="/bin/true", lora_rank=12, target_modules=target_modules)
    command = replica.command(8000)
    assert "--enable-lora" in command
    assert command[command.index("--max-lora-rank") + 1] == "12"
    at = command.index("--lora-target-modules") + 1
    assert command[at : at + len(sglang_modules)] == sglang_modules
    # On CPU SGLang's default LoRA kernels (Triton) cannot run.
    assert command[command.index("--lora-backend") + 1] == "torch_native"
    assert command[-2:] == ["--max-loras-per-batch", "4"]
    # Before any adapter is loaded the replica's own requests go to the base model.
    assert replica.request_fields == {}
