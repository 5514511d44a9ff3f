"""atropos_verl.atropos.compat against atroposlib's own code and this venv's transformers."""

import pytest
from atroposlib.envs.server_handling.server_manager import APIServerConfig, ServerBaseline, ServerManager
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
from transformers import AutoTokenizer

from atropos_verl.atropos import compat

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    compat.apply()
    compat.apply()  # idempotent: a second call must not wrap the wrapper
    return AutoTokenizer.from_pretrained(tiny_model)


def test_tokenize_for_trainer_yields_the_chat_ids_and_masks_only_the_prompt(tokenizer):
    out = tokenize_for_trainer(tokenizer, CHAT)
    expected = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tokenizer(
        tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    assert out["tokens"] == expected
    assert out["masks"] == [-100] * len(prompt) + expected[len(prompt) :]
    trained = tokenizer.decode([t for t in out["masks"] if t != -100])
    assert "It is 5." in trained and "2 + 3" not in trained


def test_tokenize_for_trainer_all_assistant_turns(tokenizer):
    chat = CHAT + [{"role": "user", "content": "And 3 + 4?"}, {"role": "assistant", "content": "7."}]
    out = tokenize_for_trainer(tokenizer, chat, train_on_all_assistant_turns=True)
    assert len(out["masks"]) == len(out["tokens"])
    trained = tokenizer.decode([t for t in out["masks"] if t != -100])
    assert "It is 5." in trained and "7." in trained and "3 + 4" not in trained


def test_explicit_return_dict_is_left_alone(tokenizer):
    assert "input_ids" in tokenizer.apply_chat_template(CHAT, return_dict=True)
    assert isinstance(tokenizer.apply_chat_template(CHAT, tokenize=False), str)


def test_a_single_server_config_keeps_its_url():
    compat.apply()
    single = APIServerConfig(base_url="http://127.0.0.1:7777/v1", model_name="m", api_key="k", server_type="openai")
    manager = ServerManager(single)
    assert [s.config.base_url for s in manager.servers] == ["http://127.0.0.1:7777/v1"]
    assert manager.servers[0].config.api_key == "k"
    # Without a URL, atroposlib's default servers are what the config means.
    defaults = ServerManager(ServerBaseline(model_name="m", server_type="openai"))
    assert [s.config.base_url for s in defaults.servers][0] == "http://localhost:9004/v1"


def test_server_configs_print_without_their_key():
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from rich.console import Console

    compat.apply()
    config = APIServerConfig(model_name="m", base_url="http://127.0.0.1:1/v1", api_key="gateway-secret")
    console = Console(record=True, width=200)
    console.print(config)
    shown = console.export_text() + repr(config)
    assert "gateway-secret" not in shown and "api_key='***'" in shown
    assert config.api_key == "gateway-secret"
