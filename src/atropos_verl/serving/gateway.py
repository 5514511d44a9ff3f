"""One HTTP address for Atropos environments, in front of the policy's inference replicas.

Environments are configured once with the gateway's URL; the trainer can restart,
add or drop replicas behind it (`set_backends`) and swap their weights between
steps without any environment noticing. Each replica is a stock vLLM OpenAI server.

Routes:

- ``GET /health``: open even when a key is set (atroposlib's health loop polls it).
- ``GET /v1/models``: the one model the gateway fronts, answered locally.
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: forwarded as they are
  (``"stream": true`` streams the backend's bytes through); ``model`` is rewritten to
  ``model_name``.
- ``POST /generate``: the two native formats atroposlib's ``vllm`` and ``sglang`` server
  types speak, translated to the backend's ``/v1/completions`` with token-id prompts,
  the sampled tokens' logprobs and exact token ids.

Every response carries ``X-Policy-Version``; ``/generate`` bodies also carry
``policy_version``. The version is the one current when the request was admitted: the
trainer pauses the gateway and drains it before it changes any weights, so that is
the version that produced the tokens. If a drain times out and the trainer syncs
anyway, the requests still running are labelled with the old version although part
of their tokens came from the new weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from atropos_verl.netutil import http_url

logger = logging.getLogger(__name__)

POLICY_VERSION_HEADER = "X-Policy-Version"

# A refused or dropped connection marks a backend down for this long, so that the
# least-in-flight rule (a dead backend always has zero in flight) stops choosing it.
_BACKEND_COOLDOWN_S = 5.0
# Bounds only the TCP connect, so an unreachable host fails over quickly; generation
# time is bounded by request_timeout_s.
_CONNECT_TIMEOUT_S = 10.0
# Long multi-turn prompts and chat histories exceed aiohttp's 1 MiB default.
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# What stop() grants running handlers before cancelling them.
_SHUTDOWN_GRACE_S = 5.0

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
_TOKEN_ID_PREFIX = "token_id:"

_T = TypeVar("_T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _HttpError(Exception):
    """Answered as ``{"error": {"message", "type", "code"}}``, the shape vLLM and OpenAI use."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(eq=False)
class _Backend:
    url: str
    in_flight: int = 0
    down_until: float = 0.0


@dataclass(frozen=True)
class _Reply:
    """A fully read backend response."""

    status: int
    content_type: str
    body: bytes
    backend_url: str


@dataclass(frozen=True)
class _VllmRequest:
    completion: dict[str, Any]
    prompt_logprobs: bool


@dataclass(frozen=True)
class _SglangRequest:
    completion: dict[str, Any]
    return_logprob: bool
    rid: str | None
    # How many times to repeat the backend's one greedy answer (see _sglang_request).
    copies: int


class Gateway:
    """Least-in-flight HTTP front for the policy's inference replicas, with a weight-sync gate.

    Runs in the caller's event loop. ``pause()`` makes new requests wait (up to
    ``max_wait_s``, then HTTP 503) and waits for the running ones to finish;
    ``resume(version)`` lets the waiters through under the new policy version.
    """

    def __init__(
        self,
        backends: list[str],
        *,
        model_name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        max_wait_s: float = 120.0,
        request_timeout_s: float = 600.0,
        extra_ports: list[int] | None = None,
    ) -> None:
        self._model_name = model_name
        self._host = host
        self._requested_port = port
        # Same app on more ports of the same host (see EngineConfig.gateway_extra_ports).
        self._extra_ports = list(extra_ports or [])
        # atroposlib's configs use "" for "no key", so an empty key means no auth too.
        self._api_key = api_key or None
        self._max_wait_s = max_wait_s
        self._request_timeout_s = request_timeout_s
        self._backends: list[_Backend] = []
        self._rr = 0
        self._policy_version = 0
        self._paused = False
        self._in_flight = 0
        # Set while requests may be dispatched: not paused and at least one backend.
        self._gate = asyncio.Event()
        # Set while nothing is in flight; pause() waits on it.
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None
        self.set_backends(backends)

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the gateway is not running; await start() first")
        return http_url(self._host, self._port)

    @property
    def policy_version(self) -> int:
        return self._policy_version

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered (streams count until their last byte)."""
        return self._in_flight

    def set_backends(self, backends: list[str]) -> None:
        """Replace the backend set. Requests already at a dropped backend finish there."""
        urls = list(dict.fromkeys(url.rstrip("/") for url in backends))
        # Keep the objects of retained backends: their in-flight counts stay exact.
        current = {b.url: b for b in self._backends}
        self._backends = [current.get(url) or _Backend(url) for url in urls]
        self._update_gate()
        logger.info("gateway backends: %s", urls or "none")

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the gateway is already running")
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=_MAX_REQUEST_BYTES)
        app.on_response_prepare.append(self._stamp_version)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._openai)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/generate", self._generate)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # the default cap of 100 would throttle env fan-out
            timeout=aiohttp.ClientTimeout(total=self._request_timeout_s, sock_connect=_CONNECT_TIMEOUT_S),
        )
        # access_log=None: one INFO line per rollout request would drown the trainer's log.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port or 0).start()
            for port in self._extra_ports:
                await web.TCPSite(runner, self._host, port).start()
        except BaseException:
            await runner.cleanup()
            await self._session.close()
            self._session = None
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.info("gateway listening on %s for model %r", self.url, self._model_name)

    async def stop(self) -> None:
        """Close the listening socket (the port is free on return) and the backend connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._port = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def pause(self, drain_timeout_s: float) -> bool:
        """Hold new requests and wait for the running ones; False if some are still running at the timeout."""
        self._paused = True
        self._update_gate()
        logger.info("gateway paused at policy version %d; draining %d requests", self._policy_version, self._in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "gateway drain timed out after %.1f s with %d requests still in flight",
                drain_timeout_s,
                self._in_flight,
            )
            return False
        return True

    def resume(self, policy_version: int) -> None:
        """Serve again, stamping responses with `policy_version`; releases the requests held by pause()."""
        self._policy_version = policy_version
        self._paused = False
        self._update_gate()
        logger.info("gateway resumed at policy version %d", policy_version)

    def _update_gate(self) -> None:
        if not self._paused and self._backends:
            self._gate.set()
        else:
            self._gate.clear()

    # --- admission, routing, forwarding ------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[int]:
        """Wait for the gate, count the request as in flight, and yield the policy version that serves it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        # A loop, not one wait: a pause can close the gate again before this task runs.
        while not self._gate.is_set():
            try:
                await asyncio.wait_for(self._gate.wait(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                if self._paused:
                    kind = "weight_sync_in_progress"
                    why = f"the gateway is paused for a weight sync (policy version {self._policy_version})"
                else:
                    kind, why = "no_backends", "the gateway has no inference backends"
                raise _HttpError(
                    503, kind, f"{why}; gave up after waiting {self._max_wait_s:g} s (max_wait_s)"
                ) from None
        # No await between the gate check and this increment, so pause() cannot miss the request.
        self._in_flight += 1
        self._idle.clear()
        try:
            yield self._policy_version
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _pick(self, excluded: list[_Backend]) -> _Backend | None:
        candidates = [b for b in self._backends if b not in excluded]
        if not candidates:
            return None
        now = asyncio.get_running_loop().time()
        # When every backend looks down, try one anyway: it may have come back.
        live = [b for b in candidates if b.down_until <= now] or candidates
        # Rotating the start point makes min() break ties round-robin.
        start = self._rr % len(live)
        self._rr += 1
        return min(live[start:] + live[:start], key=lambda b: b.in_flight)

    async def _dispatch(
        self, path: str, payload: dict[str, Any], handle: Callable[[aiohttp.ClientResponse], Awaitable[_T]]
    ) -> _T:
        """POST to the least busy backend; on a connection failure, once more to another one.

        `session.post` returns once the response headers arrive, and vLLM sends those of a
        non-streaming request only when generation ends, so a replica dying mid-generation
        is a connection failure here and the request is re-run elsewhere.
        """
        assert self._session is not None
        failures: list[tuple[_Backend, BaseException]] = []
        while len(failures) < 2:
            backend = self._pick([b for b, _ in failures])
            if backend is None:
                break
            backend.in_flight += 1
            try:
                try:
                    response = await self._session.post(backend.url + path, json=payload)
                except aiohttp.ClientConnectionError as exc:
                    backend.down_until = asyncio.get_running_loop().time() + _BACKEND_COOLDOWN_S
                    logger.warning("backend %s failed on %s: %r", backend.url, path, exc)
                    failures.append((backend, exc))
                    continue
                async with response:
                    return await handle(response)
            except asyncio.TimeoutError:
                raise _HttpError(
                    504, "backend_timeout", f"backend {backend.url} did not answer within {self._request_timeout_s:g} s"
                ) from None
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                message = f"backend {backend.url} broke off its response: {exc!r}"
                raise _HttpError(502, "bad_gateway", message) from exc
            finally:
                backend.in_flight -= 1
        if not failures:
            raise _HttpError(503, "no_backends", "the gateway has no inference backends")
        detail = "; ".join(f"{b.url}: {exc!r}" for b, exc in failures)
        raise _HttpError(502, "backend_unreachable", f"could not reach an inference backend ({detail})")

    # --- middlewares and signals -------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _HttpError as exc:
            if exc.status >= 500:
                logger.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
            return _error_response(exc.status, exc.kind, exc.message)

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self._api_key is not None and request.path != "/health":
            supplied = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(supplied, f"Bearer {self._api_key}".encode()):
                response = _error_response(401, "unauthorized", "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await handler(request)

    async def _stamp_version(self, request: web.Request, response: web.StreamResponse) -> None:
        # Handlers of admitted requests set their own (admission-time) version first.
        response.headers.setdefault(POLICY_VERSION_HEADER, str(self._policy_version))

    # --- handlers ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        # Paused still counts as healthy: requests wait at the gateway instead of failing,
        # and atroposlib stops sending at all while it believes a server is unhealthy.
        healthy = self._runner is not None and bool(self._backends)
        return web.json_response(
            {
                "status": "ok" if healthy else "unavailable",
                "policy_version": self._policy_version,
                "paused": self._paused,
                "backends": len(self._backends),
                "in_flight": self._in_flight,
            },
            status=200 if healthy else 503,
        )

    async def _models(self, request: web.Request) -> web.Response:
        # Answered here so it works during a sync or a replica restart.
        return web.json_response(
            {"object": "list", "data": [{"id": self._model_name, "object": "model", "owned_by": "atropos-verl"}]}
        )

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        # The gateway fronts exactly one model, the policy; envs often name it by its hub id
        # while replicas serve it under another name.
        body["model"] = self._model_name
        async with self._admitted() as version:
            if body.get("stream"):

                async def stream(response: aiohttp.ClientResponse) -> web.StreamResponse:
                    return await _stream_through(request, response, version)

                return await self._dispatch(request.path, body, stream)
            reply = await self._dispatch(request.path, body, _read_reply)
        return _reply_response(reply, version)

    async def _generate(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if "prompt" in body:
            vllm_request = _vllm_request(body, self._model_name)
            async with self._admitted() as version:
                reply = await self._dispatch("/v1/completions", vllm_request.completion, _read_reply)
            if reply.status != 200:
                return _reply_response(reply, version)
            result: Any = _vllm_response(_completion_json(reply), vllm_request, version, reply.backend_url)
        elif "input_ids" in body or "text" in body:
            sglang_request = _sglang_request(body, self._model_name)
            async with self._admitted() as version:
                reply = await self._dispatch("/v1/completions", sglang_request.completion, _read_reply)
            if reply.status != 200:
                return _reply_response(reply, version)
            result = _sglang_response(_completion_json(reply), sglang_request, version, reply.backend_url)
        else:
            raise _HttpError(
                400,
                "invalid_request",
                'unrecognised /generate body: expected the vLLM format ("prompt": {"prompt_token_ids": [...]}) '
                'or the SGLang format ("input_ids" or "text", with "sampling_params")',
            )
        return web.json_response(result, headers={POLICY_VERSION_HEADER: str(version)})


# --- HTTP helpers ------------------------------------------------------------------------


async def _read_reply(response: aiohttp.ClientResponse) -> _Reply:
    return _Reply(
        status=response.status,
        content_type=response.headers.get("Content-Type", "application/json"),
        body=await response.read(),
        backend_url=f"{response.url.scheme}://{response.url.host}:{response.url.port}",
    )


def _error_response(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _reply_response(reply: _Reply, version: int) -> web.Response:
    # Backend errors keep their status and body: vLLM's messages are the useful ones.
    return web.Response(
        status=reply.status,
        body=reply.body,
        headers={"Content-Type": reply.content_type, POLICY_VERSION_HEADER: str(version)},
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _HttpError(400, "invalid_request", f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _HttpError(400, "invalid_request", "the request body must be a JSON object")
    return body


async def _stream_through(request: web.Request, response: aiohttp.ClientResponse, version: int) -> web.StreamResponse:
    if response.status != 200:
        return _reply_response(await _read_reply(response), version)
    out = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": response.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
            POLICY_VERSION_HEADER: str(version),
        },
    )
    await out.prepare(request)
    try:
        async for chunk in response.content.iter_any():
            await out.write(chunk)
    except aiohttp.ClientConnectionResetError:
        # The caller hung up; closing the backend response unread makes vLLM abort the request.
        logger.debug("client of %s went away mid-stream", request.path)
        return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        # The status line is already sent, so no error response is possible: dropping the
        # connection before the final chunk is what tells the caller the stream is incomplete.
        raise ConnectionAbortedError(f"backend {response.url} broke off the stream: {exc!r}") from exc
    await out.write_eof()
    return out


def _completion_json(reply: _Reply) -> dict[str, Any]:
    try:
        data = json.loads(reply.body)
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise ValueError("no choices")
    except ValueError as exc:
        message = f"backend {reply.backend_url} sent an unexpected completion: {exc}"
        raise _HttpError(502, "bad_gateway", message) from None
    return data


# --- /generate translation ---------------------------------------------------------------


def _token_ids(value: Any, field: str) -> list[int]:
    is_ids = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    if not is_ids or not value:
        raise _HttpError(400, "invalid_request", f"{field} must be a non-empty list of token ids (one prompt)")
    return value


def _vllm_request(body: dict[str, Any], model: str) -> _VllmRequest:
    """atroposlib's `vllm` /generate body (vLLM's native SamplingParams at the top level)."""
    prompt = body["prompt"]
    if isinstance(prompt, dict):
        backend_prompt: list[int] | str = _token_ids(prompt.get("prompt_token_ids"), "prompt.prompt_token_ids")
    elif isinstance(prompt, str):
        backend_prompt = prompt
    else:
        raise _HttpError(400, "invalid_request", 'prompt must be {"prompt_token_ids": [...]} or a string')
    if body.get("stream"):
        raise _HttpError(400, "invalid_request", "stream is not supported on /generate; use /v1/completions")
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
    return _VllmRequest(completion=completion, prompt_logprobs=params.get("prompt_logprobs") is not None)


def _sglang_request(body: dict[str, Any], model: str) -> _SglangRequest:
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
        raise _HttpError(400, "invalid_request", f"unsupported /generate (SGLang format) fields: {unsupported}")
    if "input_ids" in body:
        backend_prompt: list[int] | str = _token_ids(body["input_ids"], "input_ids")
    elif isinstance(body["text"], str):
        backend_prompt = body["text"]
    else:
        raise _HttpError(400, "invalid_request", "text must be a string (one prompt)")
    sampling = body.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise _HttpError(400, "invalid_request", "sampling_params must be an object")
    unknown = sorted(k for k, v in sampling.items() if k not in _SGLANG_SAMPLING_NAMES and v is not None)
    if unknown:
        raise _HttpError(400, "invalid_request", f"unsupported sampling_params: {unknown}")
    params = {_SGLANG_SAMPLING_NAMES[k]: v for k, v in sampling.items() if v is not None}
    # SGLang answers a greedy request with n > 1 with n identical samples; vLLM refuses it.
    copies = 1
    n, temperature = params.get("n", 1), params.get("temperature", 1.0)
    if isinstance(n, int) and n > 1 and isinstance(temperature, (int, float)) and temperature < _SGLANG_GREEDY_EPS:
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
    return _SglangRequest(
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
            raise _HttpError(
                502,
                "bad_gateway",
                f"backend {backend_url} did not return token ids aligned with logprobs (is it vLLM?)",
            )
    return choices


def _parse_token_key(key: str) -> int:
    return int(key.removeprefix(_TOKEN_ID_PREFIX))


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


def _vllm_response(completion: dict[str, Any], request: _VllmRequest, version: int, backend_url: str) -> dict[str, Any]:
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


def _sglang_response(completion: dict[str, Any], request: _SglangRequest, version: int, backend_url: str) -> Any:
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
