"""Export a LoRA run's checkpoint: the adapter merged into a Hugging Face model, or the PEFT adapter folder.

    python -m atropos_verl.lora_export RUN_DIR/checkpoints/global_step_N OUT            # merged model
    python -m atropos_verl.lora_export RUN_DIR OUT --adapter                            # PEFT folder

The checkpoint argument is a ``global_step_N`` folder, or a checkpoints or run folder (its
latest checkpoint). The base model is the one the adapter was trained on (its
``adapter_config.json`` names it) unless ``--base`` names another copy of it. A full fine-tuning
run's checkpoint has no adapter: ``python -m verl.model_merger`` exports those.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from atropos_verl.checkpoint import find_checkpoint
from atropos_verl.policy.lora import ADAPTER_CONFIG, CHECKPOINT_ADAPTER


def checkpoint_adapter(checkpoint: Path) -> Path:
    """The PEFT folder a LoRA checkpoint keeps; ValueError naming what is missing otherwise."""
    directory, step = find_checkpoint(checkpoint)
    adapter = directory.actor_dir(step) / CHECKPOINT_ADAPTER
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{directory.step_dir(step)} holds no LoRA adapter ({adapter} is missing): it is not a model.lora run's "
            "checkpoint; export a full fine-tuning checkpoint with python -m verl.model_merger"
        )
    return adapter


def export(checkpoint: Path, out: Path, *, merged: bool, base: Optional[str] = None) -> Path:
    """Write the checkpoint's adapter to ``out``: a merged model (weights, config, tokenizer) or a folder copy."""
    adapter = checkpoint_adapter(checkpoint)
    if not merged:
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base or json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged_model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged_model.save_pretrained(out)
    # verl writes the tokenizer the run trained with next to its shards.
    tokenizer_source = adapter.parent / "huggingface"
    AutoTokenizer.from_pretrained(tokenizer_source if tokenizer_source.is_dir() else base).save_pretrained(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atropos_verl.lora_export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a global_step_N folder, or a checkpoints or run folder")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--adapter", action="store_true", help="keep the PEFT adapter folder instead of merging")
    parser.add_argument("--base", help="the base model (hub id or folder); default: the one the adapter names")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, merged=not args.adapter, base=args.base)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {'the adapter' if args.adapter else 'the merged model'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
