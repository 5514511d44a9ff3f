"""Print the GPU stack's versions and whether torch sees a GPU: `make gpu-check`; exits 1 without one."""

import importlib
import importlib.metadata
import sys

import torch

for module_name, distribution in (
    ("torch", "torch"),
    ("vllm", "vllm"),
    ("verl", "verl"),
    ("ray", "ray"),
    ("transformers", "transformers"),
    ("atroposlib", "atroposlib"),
    ("atropos_verl", "atropos-verl"),
):
    # Imported, not only looked up: a wheel that installed but cannot load fails here.
    module = importlib.import_module(module_name)
    version = getattr(module, "__version__", None) or importlib.metadata.version(distribution)
    print(f"{module_name:14} {version}")
print(f"{'CUDA (torch)':14} {torch.version.cuda}")
available = torch.cuda.is_available()
print(f"torch.cuda.is_available(): {available}")
for index in range(torch.cuda.device_count()):
    print(f"  cuda:{index} {torch.cuda.get_device_name(index)}")
sys.exit(0 if available else 1)
