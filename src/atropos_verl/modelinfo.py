"""What the run needs to know about a model from its Hugging Face config (read once, no weights)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional


def text_config(hf_config: Any) -> Any:
    """The language model's own config (multimodal configs nest it)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def ties_word_embeddings(hf_config: Any) -> bool:
    """True when the output projection is the input embedding (checkpoints then hold it once)."""
    return bool(getattr(text_config(hf_config), "tie_word_embeddings", False))


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    # "float32" or "bfloat16": the dtype an engine should compute in when told "auto".
    dtype: str
    tie_word_embeddings: bool
    # Positions the model was built for (GPT-2's n_positions too); None when its config names none.
    max_position_embeddings: Optional[int] = None


@functools.cache
def model_info(model_path: str, trust_remote_code: bool = False) -> ModelInfo:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    text = text_config(config)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return ModelInfo(
        vocab_size=int(text.vocab_size),
        dtype="float32" if "float32" in dtype else "bfloat16",
        tie_word_embeddings=ties_word_embeddings(config),
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
    )
