"""The native ``/generate`` formats of atroposlib's ``vllm`` and ``sglang`` server types.

Pure translation, no I/O: a native request body becomes an OpenAI ``/v1/completions``
body for a vLLM backend (token-id prompts, the sampled tokens' log-probs, exact token
ids), and the backend's completion becomes the native answer each atroposlib client
parses. A request the gateway cannot serve faithfully is refused with
:class:`HttpError` rather than silently changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# A native /generate request that leaves a parameter out gets the native server's
# default, not the model's generation_config.json defaults that vLLM's OpenAI routes
# apply (for many chat models temperature 0.6 / top_p 0.95 / top_k 20); RL sampling
# must not silently change with the model. Values from vLLM's SamplingParams.
_VLLM_NATIVE_DEFAULTS: dict[str, Any] = {
    "max_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
# Likewise from SGLang's SamplingParams (vLLM reads top_k -1 as "off" too).
_SGLANG_NATIVE_DEFAULTS: dict[str, Any] = {
    "max_tokens": 128,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
# Below this SGLang samples greedily (its _SAMPLING_EPS).
_SGLANG_GREEDY_EPS = 1e-6
# SGLang sampling_params -> vLLM /v1/completions field.
_SGLANG_SAMPLING_NAMES: dict[str, str] = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "no_stop_trim": "include_stop_str_in_output",
    "sampling_seed": "seed",
    **{
        name: name
        for name in (
            "stop",
            "stop_token_ids",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
            "n",
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "logit_bias",
        )
    },
}
# Top-level SGLang fields the gateway understands; any other one with a value is refused
# rather than silently ignored.
_SGLANG_REQUEST_KEYS = frozenset(
    {
        "input_ids",
        "text",
        "sampling_params",
        "return_logprob",
        "return_text_in_logprobs",
        "logprob_start_len",
        "top_logprobs_num",
        "rid",
        "stream",
    }
)
TOKEN_ID_PREFIX = "token_id:"


class HttpError(Exception):
    """Answered as ``{"error": {"message", "type", "code"}}``, the shape vLLM and OpenAI use."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class VllmRequest:
    completion: dict[str, Any]
    prompt_logprobs: bool


@dataclass(frozen=True)
class SglangRequest:
    completion: dict[str, Any]
    return_logprob: bool
    rid: str | None
    # How many times to repeat the backend's one greedy answer (see _sglang_request).
    copies: int


# --- /generate translation ---------------------------------------------------------------


# Samples one request may ask for: a group is one request, and no environment needs more;
# n=400000 would build an 85 MB reply while the trainer's event loop waits.
MAX_SAMPLES = 256
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(completion: dict[str, Any], max_model_len: int | None) -> None:
    """Refuse (400) sampling values no replica should be asked for, before any backend sees them."""

    def refuse(message: str) -> None:
        raise HttpError(400, "invalid_request", message)

    n = completion.get("n", 1)
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_SAMPLES):
        refuse(f"n must be an integer in [1, {MAX_SAMPLES}], got {n!r}"[:200])
    for name in _LENGTH_FIELDS:
        value = completion.get(name)
        if value is None:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            refuse(f"{name} must be a non-negative integer, got {value!r}"[:200])
        if max_model_len is not None and value > max_model_len:
            refuse(f"{name} {value} exceeds the served context of {max_model_len} tokens")
    temperature = completion.get("temperature")
    if temperature is not None and not (_number(temperature) and temperature >= 0):
        refuse(f"temperature must be a finite number >= 0, got {temperature!r}"[:200])
    top_p = completion.get("top_p")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        refuse(f"top_p must be in (0, 1], got {top_p!r}"[:200])


def _token_ids(value: Any, field: str) -> list[int]:
    is_ids = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    if not is_ids or not value:
        raise HttpError(400, "invalid_request", f"{field} must be a non-empty list of token ids (one prompt)")
    return value


def vllm_request(body: dict[str, Any], model: str) -> VllmRequest:
    """atroposlib's `vllm` /generate body (vLLM's native SamplingParams at the top level)."""
    prompt = body["prompt"]
    if isinstance(prompt, dict):
        backend_prompt: list[int] | str = _token_ids(prompt.get("prompt_token_ids"), "prompt.prompt_token_ids")
    elif isinstance(prompt, str):
        backend_prompt = prompt
    else:
        raise HttpError(400, "invalid_request", 'prompt must be {"prompt_token_ids": [...]} or a string')
    if body.get("stream"):
        raise HttpError(400, "invalid_request", "stream is not supported on /generate; use /v1/completions")
    params = {k: v for k, v in body.items() if k not in ("prompt", "stream", "model")}
    # SamplingParams' names match /v1/completions', so they pass through; vLLM validates them.
    completion = {
        **_VLLM_NATIVE_DEFAULTS,
        **params,
        "model": model,
        "prompt": backend_prompt,
        # 0 returns just the sampled token's logprob, k adds the top k.
        "logprobs": params.get("logprobs") or 0,
        # Exact ids: the sampled ids in token_ids, the top-k keys as "token_id:N".
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": False,
    }
    return VllmRequest(completion=completion, prompt_logprobs=params.get("prompt_logprobs") is not None)


def sglang_request(body: dict[str, Any], model: str) -> SglangRequest:
    """atroposlib's `sglang` /generate body (SGLang's GenerateReqInput for one prompt)."""
    unsupported = sorted(k for k, v in body.items() if k not in _SGLANG_REQUEST_KEYS and v not in (None, False))
    if body.get("stream"):
        unsupported.append("stream")
    if body.get("return_text_in_logprobs"):
        unsupported.append("return_text_in_logprobs")
    if body.get("logprob_start_len") not in (None, -1):
        unsupported.append("logprob_start_len")
    if body.get("top_logprobs_num"):
        unsupported.append("top_logprobs_num")
    if unsupported:
        raise HttpError(400, "invalid_request", f"unsupported /generate (SGLang format) fields: {unsupported}")
    if "input_ids" in body:
        backend_prompt: list[int] | str = _token_ids(body["input_ids"], "input_ids")
    elif isinstance(body["text"], str):
        backend_prompt = body["text"]
    else:
        raise HttpError(400, "invalid_request", "text must be a string (one prompt)")
    sampling = body.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise HttpError(400, "invalid_request", "sampling_params must be an object")
    unknown = sorted(k for k, v in sampling.items() if k not in _SGLANG_SAMPLING_NAMES and v is not None)
    if unknown:
        raise HttpError(400, "invalid_request", f"unsupported sampling_params: {unknown}")
    params = {_SGLANG_SAMPLING_NAMES[k]: v for k, v in sampling.items() if v is not None}
    # SGLang answers a greedy request with n > 1 with n identical samples; vLLM refuses it.
    copies = 1
    n, temperature = params.get("n", 1), params.get("temperature", 1.0)
    if (
        isinstance(n, int)
        and 1 < n <= MAX_SAMPLES
        and isinstance(temperature, (int, float))
        and temperature < _SGLANG_GREEDY_EPS
    ):
        copies, params["n"] = n, 1
    completion = {
        **_SGLANG_NATIVE_DEFAULTS,
        **params,
        "model": model,
        "prompt": backend_prompt,
        "logprobs": 0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": False,
    }
    rid = body.get("rid")
    return SglangRequest(
        completion=completion,
        return_logprob=bool(body.get("return_logprob")),
        rid=rid if isinstance(rid, str) else None,
        copies=copies,
    )


def _choices(completion: dict[str, Any], backend_url: str) -> list[dict[str, Any]]:
    """The backend's choices in index order, each checked to carry aligned ids and logprobs."""
    choices = sorted(completion["choices"], key=lambda c: c.get("index", 0))
    for choice in choices:
        ids = choice.get("token_ids")
        logprobs = choice.get("logprobs") or {}
        if not isinstance(ids, list) or len(logprobs.get("token_logprobs") or []) != len(ids):
            raise HttpError(
                502,
                "bad_gateway",
                f"backend {backend_url} did not return token ids aligned with logprobs (is it vLLM?)",
            )
    return choices


def _parse_token_key(key: str) -> int:
    return int(key.removeprefix(TOKEN_ID_PREFIX))


def _vllm_token_logprobs(choice: dict[str, Any]) -> list[list[dict[str, float]]]:
    """Per position ``[{sampled_id: lp, top_id: lp, ...}]``: the sampled token first, as atroposlib reads it."""
    positions = []
    lps = choice["logprobs"]["token_logprobs"]
    tops = choice["logprobs"].get("top_logprobs") or [None] * len(lps)
    for token_id, lp, top in zip(choice["token_ids"], lps, tops):
        entry = {str(token_id): lp}
        for key, top_lp in (top or {}).items():
            entry.setdefault(str(_parse_token_key(key)), top_lp)
        positions.append([entry])
    return positions


def vllm_response(completion: dict[str, Any], request: VllmRequest, version: int, backend_url: str) -> dict[str, Any]:
    choices = _choices(completion, backend_url)
    result: dict[str, Any] = {
        "text": [c["text"] for c in choices],
        "finish_reasons": [c.get("finish_reason") for c in choices],
        "logprobs": [_vllm_token_logprobs(c) for c in choices],
        "token_ids": [c["token_ids"] for c in choices],
        "prompt_token_ids": choices[0].get("prompt_token_ids") if choices else None,
        "policy_version": version,
    }
    if request.prompt_logprobs:
        # One list per prompt position: null for the first token, then {token_id: lp} with the
        # prompt's own token first and the top-k after it (vLLM's order).
        raw = choices[0].get("prompt_logprobs") if choices else None
        result["prompt_logprobs"] = [
            None if entry is None else {str(tid): info["logprob"] for tid, info in entry.items()} for entry in raw or []
        ]
    return result


def _sglang_finish_reason(choice: dict[str, Any]) -> dict[str, Any] | None:
    """SGLang's finish_reason: {"type": "stop", "matched": id or str}, {"type": "length", "length": n} or abort."""
    reason = choice.get("finish_reason")
    ids = choice["token_ids"]
    if reason == "length":
        return {"type": "length", "length": len(ids)}
    if reason == "stop":
        # vLLM's stop_reason is the stop string or stop token id, and null for EOS, whose id
        # is the last output token (SGLang reports EOS as a matched token).
        matched = choice.get("stop_reason")
        return {"type": "stop", "matched": matched if matched is not None else (ids[-1] if ids else None)}
    if reason == "abort":
        return {"type": "abort", "message": "aborted by the inference backend"}
    return None


def sglang_response(completion: dict[str, Any], request: SglangRequest, version: int, backend_url: str) -> Any:
    choices = _choices(completion, backend_url) * request.copies
    base_id = request.rid or completion.get("id", "")
    items = []
    for i, choice in enumerate(choices):
        ids = choice["token_ids"]
        meta: dict[str, Any] = {
            "id": base_id if len(choices) == 1 else f"{base_id}-{i}",
            "finish_reason": _sglang_finish_reason(choice),
            "prompt_tokens": len(choice.get("prompt_token_ids") or []),
            "completion_tokens": len(ids),
            # SGLang's own field for the weights that served the request (a string there).
            "weight_version": str(version),
        }
        if request.return_logprob:
            # (logprob, token_id, text); text is null as with return_text_in_logprobs=False.
            meta["output_token_logprobs"] = [
                [lp, tid, None] for lp, tid in zip(choice["logprobs"]["token_logprobs"], ids)
            ]
        items.append({"text": choice["text"], "output_ids": ids, "meta_info": meta, "policy_version": version})
    # SGLang answers a single prompt with n == 1 with one object, with n > 1 with a list.
    return items[0] if len(items) == 1 else items


# --- SGLang backends ---------------------------------------------------------------------
# An SGLang replica speaks the SGLang format itself: the request is checked as above and
# forwarded to its /generate, and only the policy version is stamped on the answer.


def sglang_native_request(body: dict[str, Any], model: str) -> tuple[dict[str, Any], SglangRequest]:
    """The body an SGLang backend's /generate gets, and the checked request (for check_sampling and rid)."""
    checked = sglang_request(body, model)
    native: dict[str, Any] = {
        "sampling_params": {k: v for k, v in (body.get("sampling_params") or {}).items() if v is not None},
        "return_logprob": checked.return_logprob,
        "stream": False,
    }
    if "input_ids" in body:
        native["input_ids"] = body["input_ids"]
    else:
        native["text"] = body["text"]
    # rid is left to the backend: SGLang refuses a rid it already runs, and n > 1 needs one per sample.
    return native, checked


def sglang_native_response(answer: Any, request: SglangRequest, version: int, backend_url: str) -> Any:
    """The backend's answer (one object, or a list for n > 1) with the gateway's policy version stamped in."""
    items = answer if isinstance(answer, list) else [answer]
    if not items or not all(isinstance(item, dict) and isinstance(item.get("meta_info"), dict) for item in items):
        message = f"backend {backend_url} sent an unexpected /generate answer (is it SGLang?)"
        raise HttpError(502, "bad_gateway", message)
    for i, item in enumerate(items):
        meta = item["meta_info"]
        if request.rid is not None:
            meta["id"] = request.rid if len(items) == 1 else f"{request.rid}-{i}"
        meta["weight_version"] = str(version)
        item["policy_version"] = version
    return answer


# The vLLM format on an SGLang backend: SamplingParams' names -> SGLang's sampling_params.
_VLLM_TO_SGLANG_SAMPLING: dict[str, str] = {vllm: sglang for sglang, vllm in _SGLANG_SAMPLING_NAMES.items()}
# Fields vllm_request sets for a vLLM backend; they have no SGLang sampling parameter.
_VLLM_BACKEND_FIELDS = frozenset(
    {"model", "prompt", "logprobs", "return_token_ids", "return_tokens_as_token_ids", "stream"}
)


def vllm_request_for_sglang(body: dict[str, Any], model: str) -> tuple[dict[str, Any], VllmRequest]:
    """atroposlib's `vllm` /generate body as an SGLang /generate body (and the checked request)."""
    checked = vllm_request(body, model)
    if checked.prompt_logprobs:
        raise HttpError(400, "invalid_request", "prompt_logprobs is not served by SGLang replicas (engine.kind=sglang)")
    completion = checked.completion
    unknown = sorted(
        k
        for k, v in completion.items()
        if k not in _VLLM_BACKEND_FIELDS and k not in _VLLM_TO_SGLANG_SAMPLING and v is not None
    )
    if unknown:
        raise HttpError(400, "invalid_request", f"unsupported /generate (vLLM format) fields on SGLang: {unknown}")
    sampling = {_VLLM_TO_SGLANG_SAMPLING[k]: v for k, v in completion.items() if k in _VLLM_TO_SGLANG_SAMPLING}
    # vLLM reads top_k 0 (its default) as "off"; SGLang wants -1 for that.
    if sampling.get("top_k") == 0:
        sampling["top_k"] = -1
    prompt = completion["prompt"]
    native: dict[str, Any] = {
        "input_ids" if isinstance(prompt, list) else "text": prompt,
        "sampling_params": {k: v for k, v in sampling.items() if v is not None},
        "return_logprob": True,
        "stream": False,
    }
    if completion["logprobs"]:
        native["top_logprobs_num"] = completion["logprobs"]
    return native, checked


def sglang_answer_as_completion(answer: Any, prompt: list[int] | str, backend_url: str) -> dict[str, Any]:
    """An SGLang /generate answer in the shape of a vLLM completion (what vllm_response reads)."""
    items = answer if isinstance(answer, list) else [answer]
    if not items or not all(isinstance(item, dict) and isinstance(item.get("meta_info"), dict) for item in items):
        message = f"backend {backend_url} sent an unexpected /generate answer (is it SGLang?)"
        raise HttpError(502, "bad_gateway", message)
    choices = []
    for index, item in enumerate(items):
        meta = item["meta_info"]
        pairs = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs")
        reason = meta.get("finish_reason")
        choices.append(
            {
                "index": index,
                "text": item.get("text", ""),
                "token_ids": item.get("output_ids"),
                "logprobs": {
                    "token_logprobs": [pair[0] for pair in pairs],
                    "top_logprobs": (
                        [{f"{TOKEN_ID_PREFIX}{entry[1]}": entry[0] for entry in position} for position in tops]
                        if tops
                        else None
                    ),
                },
                "finish_reason": reason.get("type") if isinstance(reason, dict) else None,
                "prompt_token_ids": prompt if isinstance(prompt, list) else None,
            }
        )
    return {"choices": choices}
