"""Fixes that let unmodified atroposlib 0.4.0 environments run in this project's stack.

atroposlib is archived, so these live here and are applied inside every environment
process (:mod:`atropos_verl.atropos.run_env` applies them before the environment's
code runs; ``import atropos_verl.atropos.compat as c; c.apply()`` does the same in a
process you start yourself). All are process-local and :func:`apply` is idempotent.

* **Chat templates return ids again.** transformers 5 changed the default of
  ``apply_chat_template(..., return_dict=...)`` to True, so ``tokenize=True`` yields a
  ``BatchEncoding``. atroposlib's ``tokenize_for_trainer`` (and many environments
  directly) expect the list of ids transformers 4 returned: with a ``BatchEncoding``,
  ``len()`` counts its keys and slicing fails or yields nothing, so every rollout ends
  with no trainable token and is dropped. Calls that do not pass ``return_dict`` get
  transformers 4's default back; calls that pass it are untouched.
* **A single server config keeps its URL.** When ``config_init`` returns one
  ``APIServerConfig`` instead of a list (or a ``ServerBaseline`` that ``--openai.*``
  flags turn into one), ``ServerManager`` discards it and calls
  ``localhost:9004-9007``. A single config that names a ``base_url`` is treated as the
  one-element list it means, so the environment reaches the URL it was given.
* **Keys stay out of logs.** ``serve`` prints its server configs at start; their
  ``api_key`` (the gateway's bearer token) prints as ``***``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

_PATCHED = "__atropos_verl_compat__"


def apply() -> None:
    """Install the fixes in this process (again: no-op)."""
    _restore_chat_template_ids()
    _keep_single_server_url()
    _redact_api_keys()


def _restore_chat_template_ids() -> None:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.apply_chat_template
    if getattr(original, _PATCHED, False):
        return
    signature = inspect.signature(original)
    if signature.parameters["return_dict"].default is not True:
        # transformers 4 already returns ids by default.
        return
    # Index of return_dict among the positional parameters after self and conversation.
    positional_slot = list(signature.parameters).index("return_dict") - 2

    @functools.wraps(original)
    def apply_chat_template(self: Any, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) <= positional_slot and "return_dict" not in kwargs:
            kwargs["return_dict"] = False
        return original(self, conversation, *args, **kwargs)

    setattr(apply_chat_template, _PATCHED, True)
    PreTrainedTokenizerBase.apply_chat_template = apply_chat_template  # type: ignore[method-assign]


def _keep_single_server_url() -> None:
    from atroposlib.envs.server_handling.server_manager import APIServerConfig, ServerManager

    original = ServerManager.__init__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, configs: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(configs, APIServerConfig) and configs.base_url:
            configs = [configs]
        original(self, configs, *args, **kwargs)

    setattr(__init__, _PATCHED, True)
    ServerManager.__init__ = __init__  # type: ignore[method-assign]


def _redact_api_keys() -> None:
    """Server configs print without their key: ``serve`` rich-prints them into the env's log at start."""
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig

    original = APIServerConfig.__repr_args__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def __repr_args__(self: Any) -> Any:
        for name, value in original(self):
            yield name, ("***" if name == "api_key" and value not in (None, "", "x", "unused") else value)

    setattr(__repr_args__, _PATCHED, True)
    APIServerConfig.__repr_args__ = __repr_args__  # type: ignore[method-assign]
