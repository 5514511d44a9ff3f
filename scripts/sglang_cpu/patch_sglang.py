"""Two edits that let the sglang 0.5.12 wheel serve a text model on a CPU-only torch (run by install.sh).

Run with the SGLang venv's python; idempotent, and it fails (exit 1) when a file no longer holds the
text it edits, so a different SGLang version is noticed at install time rather than at serve time.
"""

import importlib.util
import sys
from pathlib import Path

# Each: file under sglang/srt, the text as shipped, its replacement, and why.
EDITS = [
    (
        # transformers refuses to register an image processor without a real torchvision (ours is a
        # stub); text models never use one.
        "configs/utils.py",
        "    AutoImageProcessor.register(\n        config, slow_image_processor_class=image_processor, exist_ok=True\n    )",
        "    try:\n        AutoImageProcessor.register(\n"
        "            config, slow_image_processor_class=image_processor, exist_ok=True\n        )\n"
        "    except ImportError:  # atropos-verl CPU patch\n        pass",
    ),
    (
        # Pinned host memory needs a CUDA driver; on CPU the indices stay in ordinary memory.
        "layers/logits_processor.py",
        "pin_memory=True",
        "pin_memory=torch.cuda.is_available()",
    ),
]


def main() -> int:
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        print("patch_sglang: sglang is not importable by", sys.executable, file=sys.stderr)
        return 1
    srt = Path(spec.origin).parent / "srt"
    for relative, shipped, patched in EDITS:
        path = srt / relative
        text = path.read_text()
        if shipped in text:
            path.write_text(text.replace(shipped, patched))
            print("patched", path)
        elif patched not in text:
            print(f"patch_sglang: {path} holds neither the shipped nor the patched text", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
