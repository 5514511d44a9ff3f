"""Print the GPU stack's versions and whether torch sees a GPU: `make gpu-check`; exits 1 without one."""

import importlib.metadata
import sys

import torch

for distribution in ("torch", "vllm", "verl", "ray", "transformers", "atroposlib", "atropos-verl"):
    # Imported too, not only looked up: a wheel that installed but cannot load shows here.
    module = {"atropos-verl": "atropos_verl"}.get(distribution, distribution)
    __import__(module)
    print(f"{distribution:14} {importlib.metadata.version(distribution)}")
print(f"{'CUDA (torch)':14} {torch.version.cuda}")
available = torch.cuda.is_available()
print(f"torch.cuda.is_available(): {available}")
for index in range(torch.cuda.device_count()):
    print(f"  cuda:{index} {torch.cuda.get_device_name(index)}")
sys.exit(0 if available else 1)
