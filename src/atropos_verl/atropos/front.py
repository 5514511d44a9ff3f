"""The Atropos API as a run's environments and trainer see it when the run starts its own ``run-api``.

``run-api`` queues whatever matches its schema, and two kinds of group break its queue for
everyone: a group larger than the batch, or one whose size does not divide it, can never be
packed, so no later batch forms (the trainer would wait its whole ``batch_timeout``); a NaN or an
infinity makes ``/batch`` answer 500 *after* dequeuing, so the good groups of that batch go with
it. The front refuses both when they are posted (HTTP 400 with the group, field and reason;
atroposlib's environments log a client error and go on) and passes every other request through
unchanged to ``run-api`` on a private loopback port. The trainer's checks of each group's content
(vocabulary, masks, bounds) stay in :mod:`atropos_verl.groups`: the front guards the queue, the
trainer guards the model.

It also keeps the batch it last handed out until the trainer acknowledges it (``?ack=<batch_id>``
on the next ``GET /batch``), so a reply lost on the way (a client timeout after ``run-api`` had
already dequeued the batch) is served again instead of lost.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp
from aiohttp import web

from atropos_verl.netutil import http_url

logger = logging.getLogger(__name__)

# run-api itself takes bodies of any size; groups of long sequences are tens of MB.
_MAX_BODY_BYTES = 512 * 1024 * 1024
_UPSTREAM_TIMEOUT_S = 120.0
_POSTS = ("/scored_data", "/scored_data_list")


def _first_non_finite(value: Any, path: str) -> Optional[str]:
    """The path of the first NaN or infinite number in a parsed JSON value, if any."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_finite(item, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _first_non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    return None


def queue_hazard(group: Any, batch_size: int) -> Optional[tuple[str, str]]:
    """(field, reason) when ``group`` would stall or break run-api's queue for a batch of
    ``batch_size`` sequences; None when it may be queued. Anything else wrong with it is left to
    run-api's schema (it answers 422 and queues nothing) or to the trainer's checks."""
    if not isinstance(group, dict):
        return "group", f"expected a JSON object, got {type(group).__name__}"
    tokens = group.get("tokens")
    if isinstance(tokens, list):
        size = len(tokens)
        if size == 0:
            return "tokens", "group has no sequences"
        if size > batch_size or batch_size % size:
            return "tokens", (
                f"{size} sequences: a group must divide the trainer's batch of {batch_size} sequences, "
                "or run-api can never pack it and every later batch stalls behind it"
            )
    where = _first_non_finite(group, "")
    if where:
        return where, "not a finite number; run-api cannot encode it and would drop the whole batch holding it"
    return None


@dataclass
class FrontCounters:
    """What the front refused, for the trainer's per-step metrics."""

    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    batches_served_again: int = 0


class TrajectoryFront:
    """An aiohttp server on the run's API address in front of ``run-api`` at ``upstream_url``."""

    def __init__(self, upstream_url: str, host: str, port: int, batch_size: int) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.host, self.port = host, port
        self.batch_size = batch_size
        self.counters = FrontCounters()
        self._posted = 0
        self._next_batch_id = 0
        self._unacked: Optional[tuple[int, dict[str, Any]]] = None
        self._runner: Optional[web.AppRunner] = None
        self._session: Optional[aiohttp.ClientSession] = None

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    async def __aenter__(self) -> TrajectoryFront:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_post("/scored_data", self._scored_data)
        app.router.add_post("/scored_data_list", self._scored_data_list)
        app.router.add_get("/batch", self._batch)
        app.router.add_route("*", "/{tail:.*}", self._pass_through)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_UPSTREAM_TIMEOUT_S))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self.__aexit__(None, None, None)
            raise OSError(
                f"cannot listen on atropos.api_url's address {self.url}: {exc}; stop what holds the port "
                "or set atropos.api_url to a free one"
            ) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def take_counters(self) -> FrontCounters:
        """What was refused since the last call."""
        counters, self.counters = self.counters, FrontCounters()
        return counters

    # -- posts from environments ---------------------------------------------------------------

    async def _read_json(self, request: web.Request) -> Any:
        """The request's parsed body; a body that is not JSON is answered 400 here (aiohttp sends the raised reply)."""
        try:
            # aiohttp has already undone atroposlib's Content-Encoding: gzip.
            return json.loads(await request.read())
        except (ValueError, OSError) as exc:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"body is not JSON: {exc}"}), content_type="application/json"
            ) from None

    def _refusal(self, group: Any) -> Optional[str]:
        self._posted += 1
        hazard = queue_hazard(group, self.batch_size)
        if hazard is None:
            return None
        env_id = group.get("env_id") if isinstance(group, dict) else None
        reason = f"posted group #{self._posted} (env_id {env_id}): {hazard[0]}: {hazard[1]}"
        logger.warning("refused at the Atropos API: %s", reason)
        self.counters.rejected += 1
        self.counters.reasons.append(reason)
        return reason

    async def _scored_data(self, request: web.Request) -> web.StreamResponse:
        group = await self._read_json(request)
        reason = self._refusal(group)
        if reason:
            return web.json_response({"error": reason}, status=400)
        return await self._forward("POST", "/scored_data", json.dumps(group).encode())

    async def _scored_data_list(self, request: web.Request) -> web.StreamResponse:
        groups = await self._read_json(request)
        if not isinstance(groups, list):
            return web.json_response({"error": "expected a JSON list of scored groups"}, status=400)
        verdicts = [(group, self._refusal(group)) for group in groups]
        refused = [reason for _, reason in verdicts if reason]
        kept = [group for group, reason in verdicts if reason is None]
        if not kept:
            return web.json_response({"error": "; ".join(refused)}, status=400)
        response = await self._forward("POST", "/scored_data_list", json.dumps(kept).encode())
        if refused and response.status == 200:
            answer = json.loads(response.body)
            return web.json_response({**answer, "refused": refused})
        return response

    # -- batches for the trainer -------------------------------------------------------------

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        if self._unacked is not None:
            batch_id, body = self._unacked
            if request.query.get("ack") != str(batch_id):
                self.counters.batches_served_again += 1
                logger.warning("serving batch %d again: its reply was never acknowledged", batch_id)
                return web.json_response(body)
            self._unacked = None
        response = await self._forward("GET", "/batch" + (f"?{request.query_string}" if request.query_string else ""))
        if response.status != 200:
            return response
        body = json.loads(response.body)
        if isinstance(body, dict) and isinstance(body.get("batch"), list) and body["batch"]:
            self._next_batch_id += 1
            body["batch_id"] = self._next_batch_id
            self._unacked = (self._next_batch_id, body)
            return web.json_response(body)
        return response

    # -- everything else ---------------------------------------------------------------------

    async def _pass_through(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request.method, request.path_qs, await request.read() or None)

    async def _forward(self, method: str, path_qs: str, body: Optional[bytes] = None) -> web.Response:
        assert self._session is not None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            async with self._session.request(method, self.upstream_url + path_qs, data=body, headers=headers) as up:
                payload = await up.read()
                return web.Response(body=payload, status=up.status, content_type=up.content_type)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The trainer's client and atroposlib's envs retry a 5xx; run-api's own death is
            # reported by the trainer from its process state.
            return web.json_response({"error": f"run-api at {self.upstream_url} did not answer: {exc}"}, status=502)
