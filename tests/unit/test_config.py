"""Hydra composition of every config group, and start-up validation that names the bad key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from atropos_verl.config import ConfigError, load_config
from atropos_verl.train import CONF_DIR

CONF = CONF_DIR


def composed(*overrides):
    with initialize_config_dir(CONF, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    # ${hydra:...} interpolations need a running Hydra app; tests set the run paths.
    cfg.trainer.run_dir = "."
    cfg.trainer.experiment_name = "test"
    return cfg


@pytest.mark.parametrize(
    "group, options",
    [
        ("model", ["tiny", "smollm2_135m", "dialogpt", "qwen2_5_0_5b"]),
        ("advantage", ["grpo", "dr_grpo", "batch_norm", "raw"]),
        ("engine", ["external"]),
        ("data", ["atropos"]),
    ],
)
def test_every_group_option_composes_and_validates(group, options):
    for option in options:
        run = load_config(composed(f"{group}={option}"))
        assert getattr(run, group) is not None


EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    run = load_config(composed(f"+experiment={experiment}"))
    assert run.trainer.total_training_steps > 0


def test_the_sglang_gsm8k_experiment_is_the_vllm_one_served_by_sglang():
    vllm = load_config(composed("+experiment=gsm8k_1gpu"))
    sglang = load_config(composed("+experiment=gsm8k_sglang_1gpu"))
    assert (vllm.engine.kind, sglang.engine.kind) == ("vllm", "sglang")
    # SGLang's pause aborts what it holds: its answers are drained before a sync.
    assert (vllm.engine.in_flight, sglang.engine.in_flight) == ("keep", "drain")
    for section in ("data", "actor", "advantage"):
        assert getattr(vllm, section) == getattr(sglang, section), section
    assert vllm.trainer.batch_size == sglang.trainer.batch_size
    assert vllm.engine.sync_check_threshold == sglang.engine.sync_check_threshold


def test_seed_keys_exist():
    run = load_config(
        composed(
            "atropos.api_url=http://127.0.0.1:9",
            "atropos.timeout=5",
            "model.path=/m",
            "trainer.total_training_steps=3",
            "trainer.n_gpus_per_node=2",
            "trainer.nnodes=2",
            "trainer.batch_size=8",
        )
    )
    assert (run.atropos.api_url, run.atropos.timeout, run.model.path) == ("http://127.0.0.1:9", 5.0, "/m")
    assert run.trainer.world_size == 4


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["+trainer.bogus=1"], "trainer.bogus"),
        (["trainer.batch_size=abc"], "trainer.batch_size"),
        (["advantage.normalization=median"], "advantage.normalization"),
        (["advantage.clip=[3.0,1.0]"], "advantage.clip"),
        (["loss.reduction=mean"], "loss.reduction"),
        (["loss.clip_ratio=1.5"], "loss.clip_ratio"),
        (["atropos.api_url=localhost:8000"], "atropos.api_url"),
        (["trainer.device=tpu"], "trainer.device"),
        (
            ["trainer.n_gpus_per_node=2", "actor.ulysses_sequence_parallel_size=2"],
            "actor.ulysses_sequence_parallel_size",
        ),
        (
            [
                "trainer.n_gpus_per_node=3",
                "actor.ulysses_sequence_parallel_size=2",
                "model.attn_implementation=flash_attention_2",
            ],
            "actor.ulysses_sequence_parallel_size",
        ),
        (["trainer.batch_size=2", "trainer.n_gpus_per_node=4"], "trainer.batch_size"),
        (["actor.fused_optimizer=true", "actor.param_offload=true"], "actor.fused_optimizer"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    # A wrong type is refused while Hydra composes (against the run_config schema), a bad
    # value when the typed config is validated; both name the key.
    with pytest.raises((ConfigError, ConfigCompositionException)) as info:
        load_config(composed(*overrides))
    assert key in str(info.value) + str(info.value.__cause__)


def test_fused_optimizer_is_on_for_cuda_without_parameter_offload_unless_set():
    from atropos_verl.policy.verl_config import uses_fused_optimizer

    assert uses_fused_optimizer(load_config(composed()), "cuda")
    assert not uses_fused_optimizer(load_config(composed()), "cpu")
    assert not uses_fused_optimizer(load_config(composed("actor.param_offload=true")), "cuda")
    assert not uses_fused_optimizer(load_config(composed("actor.fused_optimizer=false")), "cuda")
    assert uses_fused_optimizer(load_config(composed("actor.fused_optimizer=true")), "cpu")


def test_sequences_longer_than_a_dynamic_micro_batch_are_refused_at_start_up():
    with pytest.raises(ConfigError, match="actor.max_token_len_per_gpu: must be >= trainer.max_token_len"):
        load_config(composed("trainer.max_token_len=4096", "actor.max_token_len_per_gpu=2048"))
    load_config(
        composed("trainer.max_token_len=4096", "actor.max_token_len_per_gpu=2048", "actor.use_dynamic_bsz=false")
    )
