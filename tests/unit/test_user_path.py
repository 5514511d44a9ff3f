"""What a new user's first command gets: a data source that needs no setup, lengths every model can hold,
plain prompts for models without a chat template, and environment flags by name."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from atropos_verl.config import ConfigError, EnvSpec, load_config
from atropos_verl.data.sources import render_prompt, resolve_prompt_format
from atropos_verl.train import CONF_DIR

CONF = Path(CONF_DIR)
# max_position_embeddings of the hub models in conf/model (their configs cannot be fetched here);
# the builtin models are read from their built configs by preflight's own test.
HUB_POSITIONS = {"microsoft/DialoGPT-medium": 1024, "Qwen/Qwen2.5-0.5B-Instruct": 32768}


def composed(*overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    cfg.trainer.run_dir = "."
    cfg.trainer.experiment_name = "test"
    return load_config(cfg)


def test_the_default_data_is_the_builtin_environment():
    run = composed()
    assert [(e.name, e.module) for e in run.data.envs] == [("arithmetic", "atropos_verl.envs.arithmetic")]


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_every_model_config_fits_its_positions(model, engine):
    run = composed(f"model={model}", f"engine={engine}")
    if run.model.path.startswith("builtin:"):
        from atropos_verl.assets import resolve_model_path
        from atropos_verl.modelinfo import model_info

        limit = model_info(resolve_model_path(run.model.path)).max_position_embeddings
    else:
        limit = HUB_POSITIONS[run.model.path]
    assert run.trainer.max_token_len <= limit and run.engine.max_model_len <= limit, (model, limit)


def test_a_command_line_length_still_wins_over_the_model_config():
    run = composed("model=dialogpt", "engine=vllm", "trainer.max_token_len=512")
    assert run.trainer.max_token_len == 512 and run.engine.max_model_len == 1024


def test_prompts_fall_back_to_plain_text_without_a_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "What is 2 + 3? Keep your answer short."}]
    assert resolve_prompt_format(tokenizer, "auto") == "chat"
    assert "<|im_start|>" in render_prompt(tokenizer, messages, resolve_prompt_format(tokenizer, "auto")).text
    tokenizer.chat_template = None
    assert resolve_prompt_format(tokenizer, "auto") == "plain"
    assert render_prompt(tokenizer, messages, "plain").text == "What is 2 + 3? Keep your answer short."
    assert resolve_prompt_format(tokenizer, "chat") == "chat"


def test_env_args_as_a_mapping_become_flags_by_name():
    spec = EnvSpec(
        name="e", module="m", args={"env": {"group_size": 4, "use_wandb": False, "seed": None}, "openai.timeout": 60}
    )
    spec.validate("data.envs[0]")
    assert spec.argv() == ["--env.group_size", "4", "--env.use_wandb", "false", "--openai.timeout", "60"]
    assert EnvSpec(name="e", module="m", args=["--env.group_size", 4]).argv() == ["--env.group_size", "4"]


def test_a_mapping_value_that_is_no_single_value_is_named():
    spec = EnvSpec(name="e", module="m", args={"env": {"tags": [1, 2]}})
    with pytest.raises(ConfigError, match=r"^data\.envs\[0\]\.args\.env\.tags: must be a single value"):
        spec.validate("data.envs[0]")
    with pytest.raises(ConfigError, match=r"^data\.envs\[0\]\.args: must be a list of flags or a mapping"):
        EnvSpec(name="e", module="m", args="--env.seed 1").validate("data.envs[0]")


def test_data_temperature_reaches_every_environment_and_its_own_flag_wins():
    from atropos_verl.atropos.environments import env_command
    from atropos_verl.preflight import flag_value

    run = composed("data=gsm8k", "data.temperature=0.6")
    [spec] = run.data.envs
    assert (
        flag_value(env_command(spec, "http://api", "/m", None, temperature=run.data.temperature), "--env.temperature")
        == "0.6"
    )
    assert "--env.temperature" not in env_command(spec, "http://api", "/m", None)
    own = EnvSpec(name="e", module="m", args={"env": {"temperature": 1.2}})
    assert flag_value(env_command(own, "http://api", "/m", None, temperature=0.6), "--env.temperature") == "1.2"


def test_dataset_flags_are_edited_by_name_on_the_command_line():
    run = composed("data=gsm8k_math", "data.envs.1.args.env.source=/data/math/train.jsonl")
    from atropos_verl.preflight import flag_value

    assert flag_value(run.data.envs[1].argv(), "--env.source") == "/data/math/train.jsonl"
    assert flag_value(run.data.envs[0].argv(), "--env.source") == "openai/gsm8k"
