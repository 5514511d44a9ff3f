"""Start SGLang's HTTP server as the trainer needs it: ``python launch.py <sglang server args>``.

Runs by path under SGLang's interpreter (its own venv: no atropos_verl, no project packages), so
it imports only SGLang and the standard library. Two things ``python -m sglang.launch_server``
cannot do:

- the run's replica token: SGLang's ``--api-key`` would have to sit on the command line and is
  logged with the server args at start-up, so the token comes in the environment and
  ``replicas/access.py``'s middleware (loaded by file path) checks it on every route but /health;
- the served model name: SGLang 0.5.12 renames the model to the weights folder after
  ``/update_weights_from_disk``, so ``/v1/models`` and the OpenAI answers would stop naming the
  policy after the first sync; the name given at launch is kept;
- pinned host memory where there is no CUDA: SGLang's LoRA layers and its ``torch_native`` LoRA
  backend pin their index tensors unconditionally, which a CPU-only torch refuses
  ("pin_memory=True requires a CUDA or other accelerator backend"); see :func:`_unpinned_without_cuda`;
- the LoRA usage count of a request with ``n > 1``: SGLang 0.5.12 counts ``batch x n`` uses of
  its adapter but releases ``batch x n + batch`` (the prefix-caching request it sends first per
  prompt releases one too), so the count goes below zero and ``/unload_lora_adapter``, which
  waits for it to reach zero, never returns (and holds the lock every later load waits on);
  see :func:`_count_prefix_requests`.
"""

import importlib.util
import os
import sys
from pathlib import Path

_ACCESS = Path(__file__).resolve().parents[1] / "replicas" / "access.py"


def _unpinned_without_cuda() -> None:
    """Without CUDA, make pinning a no-op: a pinned tensor only speeds up copies to a GPU.

    Runs at import, not in main(): SGLang starts its scheduler with the ``spawn`` method, which
    imports this file again (as ``__mp_main__``) in the child, where the LoRA layers are built.
    """
    import torch

    if torch.cuda.is_available():
        return
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self

    def unpinned(factory):
        def create(*args, pin_memory=False, **kwargs):
            return factory(*args, **kwargs)

        return create

    for name in ("tensor", "zeros", "ones", "empty", "full", "arange"):
        setattr(torch, name, unpinned(getattr(torch, name)))


_unpinned_without_cuda()


def _load_access():
    spec = importlib.util.spec_from_file_location("atropos_verl_replica_access", _ACCESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keep_served_name() -> None:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    update = TokenizerManager._update_model_path_info

    def update_keeping_name(self, model_path, load_format):
        served = self.served_model_name
        update(self, model_path, load_format)
        self.served_model_name = served

    TokenizerManager._update_model_path_info = update_keeping_name


def _count_prefix_requests() -> None:
    """Hold the adapter once more per prompt for the prefix-caching request of an ``n > 1`` request."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    resolve = TokenizerManager._resolve_lora_path

    async def resolve_counting_prefixes(self, obj):
        await resolve(self, obj)
        if not obj.is_single and getattr(obj, "parallel_sample_num", 1) > 1:
            # lora_path is the prompts' list repeated n times: its first batch_size entries are the prompts' own.
            await self.lora_registry.acquire(obj.lora_path[: obj.batch_size])

    TokenizerManager._resolve_lora_path = resolve_counting_prefixes


def main(argv: list[str]) -> None:
    from sglang.launch_server import run_server
    from sglang.srt.entrypoints import http_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    access = _load_access()
    if os.environ.get(access.TOKEN_ENV):
        http_server.app.add_middleware(access.RequireReplicaToken)
    _keep_served_name()
    _count_prefix_requests()
    load_plugins()
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        # The scheduler and detokenizer are children; none may outlive the server.
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main(sys.argv[1:])
