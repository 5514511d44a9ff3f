"""One HTTP address for Atropos environments, in front of the policy's inference replicas.

Environments are configured once with the gateway's URL; the trainer can restart,
add or drop replicas behind it (`set_backends`) and swap their weights between
steps without any environment noticing. Each replica is a vLLM or an SGLang server (``backend_engine``).

Routes:

- ``GET /health``: open even when a key is set (atroposlib's health loop polls it).
- ``GET /v1/models``: the one model the gateway fronts, answered locally.
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: forwarded as they are
  (``"stream": true`` streams the backend's bytes through); ``model`` is rewritten to
  ``model_name``.
- ``POST /generate``: the two native formats atroposlib's ``vllm`` and ``sglang`` server
  types speak. For vLLM replicas both are translated to the backend's ``/v1/completions``
  with token-id prompts, the sampled tokens' logprobs and exact token ids; SGLang replicas
  get the SGLang format, checked the same way, on their own ``/generate``, and the vLLM
  format translated to it (``prompt_logprobs`` excepted).

Every response carries ``X-Policy-Version``; ``/generate`` bodies also carry
``policy_version``. With a :class:`~atropos_verl.serving.lineage.PolicyLineage`, the
gateway also records the token ids of every completion it returns with that version
(the OpenAI routes ask the backend for ``return_token_ids`` and drop them again from the
answer unless the caller asked; streamed completions are not recorded), so the trainer
can tell which policy sampled each sequence it trains on.

The version is the one current when the request was admitted: the trainer pauses the
gateway and drains it before it changes any weights, so that is the version that
produced the tokens. If a drain times out and the trainer syncs anyway, or with
``engine.in_flight=keep`` (no drain), the requests still running are labelled with the
old version although part of their tokens came from the new weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from atropos_verl.netutil import http_url
from atropos_verl.serving.generate_formats import (
    HttpError,
    check_sampling,
    sglang_answer_as_completion,
    sglang_native_request,
    sglang_native_response,
    sglang_request,
    sglang_response,
    vllm_request,
    vllm_request_for_sglang,
    vllm_response,
)
from atropos_verl.serving.lineage import PolicyLineage

logger = logging.getLogger(__name__)

POLICY_VERSION_HEADER = "X-Policy-Version"
BACKEND_ENGINES = ("vllm", "sglang")

# A refused or dropped connection marks a backend down for this long, so that the
# least-in-flight rule (a dead backend always has zero in flight) stops choosing it.
_BACKEND_COOLDOWN_S = 5.0
# Bounds only the TCP connect, so an unreachable host fails over quickly; generation
# time is bounded by request_timeout_s.
_CONNECT_TIMEOUT_S = 10.0
# vLLM's and SGLang's HTTP servers (uvicorn) close a connection idle for 5 s. A request sent on a
# pooled connection just as the server closes it fails to write ("Can not write request body"),
# a 502 when there is one replica (bench/gateway_overhead.py hit it after a 5 s lull). Dropping
# idle connections well before the server does leaves no such race.
_BACKEND_KEEPALIVE_S = 3.0
# Long multi-turn prompts and chat histories exceed aiohttp's 1 MiB default.
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# What stop() grants running handlers before cancelling them.
_SHUTDOWN_GRACE_S = 5.0

_T = TypeVar("_T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        max_model_len: int | None = None,
        idle_timeout_s: float = 30.0,
        backend_headers: dict[str, str] | None = None,
        backend_engine: str = "vllm",
        lineage: PolicyLineage | None = None,
    ) -> None:
        if backend_engine not in BACKEND_ENGINES:
            raise ValueError(f"backend_engine must be one of {BACKEND_ENGINES}, got {backend_engine!r}")
        # What the replicas are: /generate is translated for vLLM, passed through to SGLang.
        self._backend_engine = backend_engine
        self._model_name = model_name
        self._host = host
        self._requested_port = port
        # Same app on more ports of the same host (see EngineConfig.gateway_extra_ports).
        self._extra_ports = list(extra_ports or [])
        # atroposlib's configs use "" for "no key", so an empty key means no auth too.
        self._api_key = api_key or None
        self._max_wait_s = max_wait_s
        self._request_timeout_s = request_timeout_s
        # Requests for more tokens than replicas hold are refused here, not deep in a backend.
        self._max_model_len = max_model_len
        # A connection that sends no request, or a body that does not arrive, within this is dropped.
        self._idle_timeout_s = idle_timeout_s
        # Sent to every backend (the run's replica token); never forwarded from callers.
        self._backend_headers = dict(backend_headers or {})
        self._lineage = lineage
        # With LoRA (atropos_verl.serving.lora) replicas serve the policy under the current adapter's name.
        self._adapter_name: str | None = None
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
            headers=self._backend_headers,
            # The default cap of 100 connections would throttle env fan-out.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=_BACKEND_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self._request_timeout_s, sock_connect=_CONNECT_TIMEOUT_S),
        )
        # access_log=None: one INFO line per rollout request would drown the trainer's log.
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S, keepalive_timeout=self._idle_timeout_s
        )
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

    async def pause(self, drain_timeout_s: float, drain: bool = True) -> bool:
        """Hold new requests and wait for the running ones; False if some are still running at the timeout.

        Without ``drain`` the running ones carry on in the engines, which hold them while the
        weights change (``engine.in_flight=keep``); they keep the version they started under.
        """
        self._paused = True
        self._update_gate()
        if not drain:
            logger.info(
                "gateway paused at policy version %d; %d requests stay in flight", self._policy_version, self._in_flight
            )
            return True
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

    def serve_adapter(self, name: str | None) -> None:
        """Send requests for the policy to the replicas' LoRA adapter ``name`` (None: the base model).

        Called while paused, before ``resume``: every request admitted afterwards goes to the new adapter.
        """
        self._adapter_name = name

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
                raise HttpError(
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
        # Rewritten at dispatch, after admission: a request held by a sync goes to the adapter it waited for.
        if self._adapter_name is not None and self._backend_engine == "sglang":
            # SGLang picks the adapter by lora_path on /generate and the OpenAI routes alike (a caller's is replaced).
            payload = {**payload, "lora_path": self._adapter_name}
        elif self._adapter_name is not None and "model" in payload:
            payload = {**payload, "model": self._adapter_name}
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
                raise HttpError(
                    504, "backend_timeout", f"backend {backend.url} did not answer within {self._request_timeout_s:g} s"
                ) from None
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                message = f"backend {backend.url} broke off its response: {exc!r}"
                raise HttpError(502, "bad_gateway", message) from exc
            finally:
                backend.in_flight -= 1
        if not failures:
            raise HttpError(503, "no_backends", "the gateway has no inference backends")
        detail = "; ".join(f"{b.url}: {exc!r}" for b, exc in failures)
        raise HttpError(502, "backend_unreachable", f"could not reach an inference backend ({detail})")

    # --- middlewares and signals -------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            if exc.status >= 500:
                logger.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
            return _error_response(exc.status, exc.kind, exc.message)

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self._api_key is not None and request.path != "/health":
            # aiohttp keeps undecodable header bytes as surrogates; they must compare, not crash.
            supplied = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
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
        body = await _json_object(request, self._idle_timeout_s)
        check_sampling(body, self._max_model_len)
        # The gateway fronts exactly one model, the policy; envs often name it by its hub id
        # while replicas serve it under another name.
        body["model"] = self._model_name
        caller_wants_ids = bool(body.get("return_token_ids"))
        if self._lineage is not None and not body.get("stream"):
            body["return_token_ids"] = True
        async with self._admitted() as version:
            if body.get("stream"):

                async def stream(response: aiohttp.ClientResponse) -> web.StreamResponse:
                    return await _stream_through(request, response, version)

                return await self._dispatch(request.path, body, stream)
            reply = await self._dispatch(request.path, body, _read_reply)
        if self._lineage is not None and reply.status == 200:
            reply = self._record_openai(reply, version, keep_ids=caller_wants_ids)
        return _reply_response(reply, version)

    def _record_openai(self, reply: _Reply, version: int, keep_ids: bool) -> _Reply:
        """Record each choice's token ids; the answer loses the ids the caller did not ask for."""
        assert self._lineage is not None
        completion = _completion_json(reply)
        for choice in completion["choices"]:
            if isinstance(choice, dict) and isinstance(choice.get("token_ids"), list):
                self._lineage.record(choice["token_ids"], version)
        if keep_ids:
            return reply
        # Null, as vLLM answers without return_token_ids.
        for choice in completion["choices"]:
            if isinstance(choice, dict):
                for name in ("token_ids", "prompt_token_ids"):
                    if name in choice:
                        choice[name] = None
        if "prompt_token_ids" in completion:
            completion["prompt_token_ids"] = None
        return dataclasses.replace(reply, body=json.dumps(completion).encode())

    async def _generate(self, request: web.Request) -> web.Response:
        body = await _json_object(request, self._idle_timeout_s)
        if self._backend_engine == "sglang":
            return await self._generate_on_sglang(body)
        if "prompt" in body:
            native = vllm_request(body, self._model_name)
            check_sampling(native.completion, self._max_model_len)
            async with self._admitted() as version:
                reply = await self._dispatch("/v1/completions", native.completion, _read_reply)
            if reply.status != 200:
                return _reply_response(reply, version)
            result: Any = vllm_response(_completion_json(reply), native, version, reply.backend_url)
            completions = result["token_ids"]
        elif "input_ids" in body or "text" in body:
            native_sglang = sglang_request(body, self._model_name)
            # A greedy n is served as copies of one sample: sglang_request bounded n already.
            check_sampling(native_sglang.completion, self._max_model_len)
            async with self._admitted() as version:
                reply = await self._dispatch("/v1/completions", native_sglang.completion, _read_reply)
            if reply.status != 200:
                return _reply_response(reply, version)
            result = sglang_response(_completion_json(reply), native_sglang, version, reply.backend_url)
            completions = [item["output_ids"] for item in (result if isinstance(result, list) else [result])]
        else:
            raise HttpError(
                400,
                "invalid_request",
                'unrecognised /generate body: expected the vLLM format ("prompt": {"prompt_token_ids": [...]}) '
                'or the SGLang format ("input_ids" or "text", with "sampling_params")',
            )
        self._record_generated(completions, version)
        return web.json_response(result, headers={POLICY_VERSION_HEADER: str(version)})

    def _record_generated(self, completions: list[Any], version: int) -> None:
        """Each /generate completion's token ids in the lineage, with the version that served it."""
        if self._lineage is not None:
            for token_ids in completions:
                if isinstance(token_ids, list):
                    self._lineage.record(token_ids, version)

    async def _generate_on_sglang(self, body: dict[str, Any]) -> web.Response:
        if "prompt" in body:
            native, vllm_checked = vllm_request_for_sglang(body, self._model_name)
            check_sampling(vllm_checked.completion, self._max_model_len)
        elif "input_ids" in body or "text" in body:
            native, checked = sglang_native_request(body, self._model_name)
            check_sampling(checked.completion, self._max_model_len)
        else:
            raise HttpError(
                400,
                "invalid_request",
                'unrecognised /generate body: expected the vLLM format ("prompt": {"prompt_token_ids": [...]}) '
                'or the SGLang format ("input_ids" or "text", with "sampling_params")',
            )
        async with self._admitted() as version:
            reply = await self._dispatch("/generate", native, _read_reply)
        if reply.status != 200:
            return _reply_response(reply, version)
        try:
            answer = json.loads(reply.body)
        except ValueError:
            message = f"backend {reply.backend_url} sent a /generate answer that is not JSON"
            raise HttpError(502, "bad_gateway", message) from None
        if "prompt" in body:
            prompt = native.get("input_ids", native.get("text"))
            completion = sglang_answer_as_completion(answer, prompt, reply.backend_url)
            result = vllm_response(completion, vllm_checked, version, reply.backend_url)
            completions = result["token_ids"]
        else:
            result = sglang_native_response(answer, checked, version, reply.backend_url)
            completions = [item.get("output_ids") for item in (result if isinstance(result, list) else [result])]
        self._record_generated(completions, version)
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


async def _json_object(request: web.Request, read_timeout_s: float) -> dict[str, Any]:
    """The request's JSON object; anything else (or a body that does not arrive in time) is a 400."""
    try:
        raw = await asyncio.wait_for(request.read(), read_timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(
            408, "request_timeout", f"the request body did not arrive within {read_timeout_s:g} s"
        ) from None
    try:
        body = json.loads(raw.decode(request.charset or "utf-8"))
    except (ValueError, LookupError, RecursionError) as exc:
        # ValueError covers bad JSON and bad UTF-8, LookupError an unknown charset,
        # RecursionError JSON nested deeper than Python parses.
        raise HttpError(400, "invalid_request", f"the request body is not JSON: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "the request body must be a JSON object")
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
        raise HttpError(502, "bad_gateway", message) from None
    return data
