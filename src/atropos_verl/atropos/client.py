"""Async client for the Atropos trajectory API (atroposlib 0.4.0 `run-api`).

The server keeps all state in memory and has quirks this client absorbs so the
trainer does not have to (read from atroposlib/api/server.py):

* data posted before the first /register makes /register skip initialisation
  (the "lock-out"): /info then reports batch_size -1 and /batch answers
  {"status": "error"} until /reset_data;
* a second /register is accepted but ignored: the first trainer's batch_size stays;
* /reset_data without a following /register makes /batch fail with HTTP 500;
* /batch dequeues a batch *before* encoding it, so a group holding NaN/Inf gives
  HTTP 500 and that batch is gone (a retry sees the next batch or null).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_BODY_EXCERPT_CHARS = 300


class AtroposAPIError(RuntimeError):
    """The Atropos API could not be used; the message names the URL and the cause."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Atropos API at {url}: {reason}")
        self.url = url
        self.reason = reason


class _TransientError(Exception):
    """A failure a later attempt may not see: network, timeout, 5xx, garbled body."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _RegistrationLost(Exception):
    """The server does not know this trainer (lock-out, restart or /reset_data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _BatchEncodingFailed(Exception):
    """GET /batch answered 500: must not be retried blindly, the batch may be gone."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrainerRegistration:
    """The body of POST /register (all fields are required by the server)."""

    wandb_group: str
    wandb_project: str
    batch_size: int
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int


@dataclass(frozen=True)
class ApiStatus:
    """GET /status. `queue_size` counts queued groups, not sequences."""

    current_step: int
    queue_size: int


def _excerpt(text: str) -> str:
    text = text.strip()
    if len(text) > _BODY_EXCERPT_CHARS:
        return text[:_BODY_EXCERPT_CHARS] + "..."
    return text or "<empty body>"


def _describe(exc: BaseException) -> str:
    # repr() of aiohttp's connector errors buries the cause in connection-key fields.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _int_field(body: dict[str, Any], key: str, what: str) -> int:
    value = body.get(key)
    # bool is an int subclass; a True here would be a server bug, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _TransientError(f"{what} returned {key}={value!r}, expected an integer: {_excerpt(json.dumps(body))}")
    return value


async def _sleep_or_stop(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep, waking early if `stop` is set; True when stopped."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        return False
    return True


class AtroposClient:
    """Trainer-side client: register, then pull batches of scored groups.

    Use as `async with AtroposClient(url, registration) as client:`. Its counters
    (`batches_received`, `retries`, `reregistrations`, `resets`) are logged per step
    (:meth:`counters`).
    """

    def __init__(
        self,
        api_url: str,
        registration: TrainerRegistration,
        *,
        request_timeout_s: float = 30.0,
        connect_deadline_s: float = 60.0,
        poll_interval_s: float = 0.2,
        max_poll_interval_s: float = 5.0,
        max_retries: int = 5,
        retry_backoff_s: float = 0.5,
        reset_on_mismatch: bool = False,
    ) -> None:
        if request_timeout_s <= 0 or connect_deadline_s < 0 or poll_interval_s <= 0 or retry_backoff_s < 0:
            raise ValueError("timeouts and intervals must be positive")
        if max_poll_interval_s < poll_interval_s:
            raise ValueError("max_poll_interval_s must be >= poll_interval_s")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.api_url = api_url.rstrip("/")
        self.registration = registration
        self.request_timeout_s = request_timeout_s
        self.connect_deadline_s = connect_deadline_s
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.reset_on_mismatch = reset_on_mismatch
        self.uuid: int | None = None
        self.batches_received = 0
        self.retries = 0
        self.reregistrations = 0
        self.resets = 0
        self._session: aiohttp.ClientSession | None = None
        self._unacked_batch: int | None = None

    async def __aenter__(self) -> AtroposClient:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout_s))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- transport -------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        payload: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> str:
        if self._session is None:
            raise RuntimeError("AtroposClient is not open; use `async with AtroposClient(...) as client`")
        timeout = aiohttp.ClientTimeout(total=timeout_s if timeout_s is not None else self.request_timeout_s)
        try:
            async with self._session.request(method, self.api_url + path, json=payload, timeout=timeout) as resp:
                status = resp.status
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _TransientError(f"{method} {path} failed: {_describe(exc)}") from exc
        if status >= 500:
            raise _TransientError(f"{method} {path} returned HTTP {status}: {_excerpt(text)}", status=status)
        if status >= 400:
            # A 4xx will not change on retry: wrong URL, or a server of another version.
            raise AtroposAPIError(self.api_url, f"{method} {path} returned HTTP {status}: {_excerpt(text)}")
        return text

    async def _request_json(
        self,
        method: str,
        path: str,
        *,
        payload: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        text = await self._request(method, path, payload=payload, timeout_s=timeout_s)
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise _TransientError(f"{method} {path} returned a body that is not JSON: {_excerpt(text)}") from exc
        if not isinstance(body, dict):
            raise _TransientError(f"{method} {path} returned JSON that is not an object: {_excerpt(text)}")
        return body

    def _log_retry(self, what: str, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        reason = exc.reason if isinstance(exc, _TransientError) else _describe(exc) if exc else "no result"
        logger.warning(
            "Atropos API at %s: %s attempt %d/%d failed (%s); retrying in %.2fs",
            self.api_url,
            what,
            state.attempt_number,
            self.max_retries + 1,
            reason,
            state.upcoming_sleep,
        )

    async def _with_retries(self, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=self.retry_backoff_s, max=self.max_poll_interval_s),
            retry=retry_if_exception_type(_TransientError),
            before_sleep=functools.partial(self._log_retry, what),
            reraise=True,
        )
        try:
            return await retrying(attempt)
        except _TransientError as exc:
            raise AtroposAPIError(
                self.api_url, f"{what} failed after {self.max_retries + 1} attempt(s): {exc.reason}"
            ) from exc

    # -- start-up ----------------------------------------------------------------------------

    async def wait_until_reachable(self) -> ApiStatus:
        """Poll GET /status with exponential backoff until it answers or `connect_deadline_s` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_deadline_s
        delay = self.poll_interval_s
        while True:
            # Never let one attempt run past the deadline the caller asked for.
            attempt_timeout = max(min(self.request_timeout_s, deadline - loop.time()), 0.05)
            try:
                return self._parse_status(await self._request_json("GET", "/status", timeout_s=attempt_timeout))
            except _TransientError as exc:
                last_error = exc.reason
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AtroposAPIError(
                    self.api_url, f"unreachable after {self.connect_deadline_s}s (last error: {last_error})"
                )
            logger.info("Atropos API at %s not reachable yet (%s); retrying", self.api_url, last_error)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, self.max_poll_interval_s)

    async def _post_registration(self) -> int:
        async def attempt() -> int:
            body = await self._request_json("POST", "/register", payload=dataclasses.asdict(self.registration))
            return _int_field(body, "uuid", "POST /register")

        uuid = await self._with_retries("POST /register", attempt)
        if self.uuid is not None:
            self.reregistrations += 1
        self.uuid = uuid
        return uuid

    async def _registered_shape(self) -> tuple[int, int]:
        body = await self.info()
        return _int_field(body, "batch_size", "GET /info"), _int_field(body, "max_token_len", "GET /info")

    async def register(self) -> int:
        """POST /register, then check via /info that the server really uses our batch shape.

        The server silently keeps the first registration, so a mismatch is only
        visible through /info. Returns the uuid the server assigned.
        """
        ours = (self.registration.batch_size, self.registration.max_token_len)
        uuid = await self._post_registration()
        theirs = await self._registered_shape()
        if theirs == ours:
            return uuid
        if theirs[0] == -1:
            logger.warning(
                "Atropos API at %s ignored /register: an environment posted data before any trainer registered "
                "(lock-out). Calling /reset_data and registering again; the data queued so far is dropped.",
                self.api_url,
            )
        elif self.reset_on_mismatch:
            logger.warning(
                "Atropos API at %s is registered with batch_size=%d, max_token_len=%d but this trainer uses "
                "batch_size=%d, max_token_len=%d; reset_on_mismatch is set, so calling /reset_data (queued data and "
                "environment registrations are dropped) and registering again.",
                self.api_url,
                *theirs,
                *ours,
            )
        else:
            raise AtroposAPIError(
                self.api_url,
                f"already registered with batch_size={theirs[0]}, max_token_len={theirs[1]}, but this trainer "
                f"needs batch_size={ours[0]}, max_token_len={ours[1]}; the server keeps the first registration. "
                "Restart the API server, or set reset_on_mismatch=True to drop its state via /reset_data.",
            )
        await self.reset()
        uuid = await self._post_registration()
        theirs = await self._registered_shape()
        if theirs != ours:
            raise AtroposAPIError(
                self.api_url,
                f"still reports batch_size={theirs[0]}, max_token_len={theirs[1]} after /reset_data and /register "
                f"(wanted batch_size={ours[0]}, max_token_len={ours[1]}); another trainer may be registering "
                "against the same API.",
            )
        return uuid

    # -- batches -----------------------------------------------------------------------------

    async def _batch_attempt(self) -> list[dict[str, Any]] | None:
        # The project's front (atropos/front.py) serves a batch again until it is acknowledged;
        # asking for the next one acknowledges the last, which BatchSource has spooled by then.
        path = "/batch" if self._unacked_batch is None else f"/batch?ack={self._unacked_batch}"
        try:
            body = await self._request_json("GET", path)
        except _TransientError as exc:
            if exc.status == 500:
                raise _BatchEncodingFailed(exc.reason) from exc
            raise
        if body.get("status") == "error":
            raise _RegistrationLost(f"GET /batch answered {body.get('message')!r}")
        if "batch" in body and body["batch"] is None:
            self._unacked_batch = None
            return None
        batch = body.get("batch")
        if not isinstance(batch, list) or not batch or not all(isinstance(group, dict) for group in batch):
            raise _TransientError(
                f"GET /batch returned no non-empty list of groups and no null 'batch': {_excerpt(json.dumps(body))}"
            )
        batch_id = body.get("batch_id")
        self._unacked_batch = batch_id if isinstance(batch_id, int) and not isinstance(batch_id, bool) else None
        return batch

    async def _fetch_batch(self) -> list[dict[str, Any]] | None:
        try:
            return await self._with_retries("GET /batch", self._batch_attempt)
        except _BatchEncodingFailed as failed:
            # The same 500 has two causes; /info tells them apart.
            if (await self._registered_shape())[0] == -1:
                raise _RegistrationLost(
                    f"{failed.reason} and /info shows no registration (/reset_data was called)"
                ) from failed
            raise AtroposAPIError(
                self.api_url,
                f"{failed.reason}. The server dequeues a batch before encoding it, so that batch is lost and "
                "current_step has already advanced; the usual cause is a NaN or Inf value (score, advantage, "
                "logprob) in a scored group, which JSON cannot encode. Fix the environment's scoring.",
            ) from failed

    async def get_batch(self) -> list[dict[str, Any]] | None:
        """GET /batch once: the list of scored-group dicts, or None when no full batch is queued.

        Re-registers once if the server has lost this trainer's registration.
        """
        try:
            batch = await self._fetch_batch()
        except _RegistrationLost as lost:
            logger.warning(
                "Atropos API at %s does not know this trainer (%s): the API restarted, /reset_data was called, "
                "or an environment posted data before the trainer registered. Registering again; environments "
                "must re-register too.",
                self.api_url,
                lost.reason,
            )
            await self.register()
            try:
                batch = await self._fetch_batch()
            except _RegistrationLost as again:
                raise AtroposAPIError(
                    self.api_url, f"trainer still not registered after registering again: {again.reason}"
                ) from again
        if batch is not None:
            self.batches_received += 1
        return batch

    async def next_batch(
        self,
        deadline_s: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[dict[str, Any]] | None:
        """Poll until a batch arrives; None if `stop` is set.

        Sleeps poll_interval_s, doubling up to max_poll_interval_s. Raises
        AtroposAPIError after `deadline_s` without a batch. With neither a deadline
        nor a stop event it waits as long as it takes.
        """
        loop = asyncio.get_running_loop()
        give_up_at = None if deadline_s is None else loop.time() + deadline_s
        delay = self.poll_interval_s
        while stop is None or not stop.is_set():
            batch = await self.get_batch()
            if batch is not None:
                return batch
            pause = delay
            if give_up_at is not None:
                remaining = give_up_at - loop.time()
                if remaining <= 0:
                    raise AtroposAPIError(
                        self.api_url, f"no batch from GET /batch within {deadline_s}s; {await self._queue_report()}"
                    )
                pause = min(pause, remaining)
            if await _sleep_or_stop(stop, pause):
                break
            delay = min(delay * 2, self.max_poll_interval_s)
        return None

    async def _queue_report(self) -> str:
        try:
            status = await self.status()
        except AtroposAPIError as exc:
            return f"queue_size unknown ({exc.reason})"
        report = f"queue_size={status.queue_size} groups, current_step={status.current_step}"
        if status.queue_size:
            # /batch only packs groups whose sizes fill the largest group size exactly.
            report += (
                f"; queued groups do not pack into batch_size={self.registration.batch_size} "
                "(group sizes must be powers of two dividing batch_size) or not enough sequences are queued"
            )
        return report

    # -- small endpoints ---------------------------------------------------------------------

    def _parse_status(self, body: dict[str, Any]) -> ApiStatus:
        return ApiStatus(
            current_step=_int_field(body, "current_step", "GET /status"),
            queue_size=_int_field(body, "queue_size", "GET /status"),
        )

    async def status(self) -> ApiStatus:
        """GET /status (zeros while the server is unregistered or locked out)."""

        async def attempt() -> ApiStatus:
            return self._parse_status(await self._request_json("GET", "/status"))

        return await self._with_retries("GET /status", attempt)

    async def info(self) -> dict[str, Any]:
        """GET /info: the registered batch_size and max_token_len (-1 when unregistered)."""
        return await self._with_retries("GET /info", functools.partial(self._request_json, "GET", "/info"))

    def counters(self) -> dict[str, float]:
        """How often the API had to be retried, re-registered with or reset: the run's API health."""
        return {
            "api/batches_received": self.batches_received,
            "api/retries": self.retries,
            "api/reregistrations": self.reregistrations,
            "api/resets": self.resets,
        }

    async def latest_example(self) -> dict[str, Any]:
        """GET /latest_example: the last scored group the API received (empty lists before any)."""
        return await self._with_retries(
            "GET /latest_example", functools.partial(self._request_json, "GET", "/latest_example")
        )

    async def reset(self) -> None:
        """GET /reset_data: drops the queue, registrations, environments and step counter."""
        await self._with_retries("GET /reset_data", functools.partial(self._request, "GET", "/reset_data"))
        self.resets += 1
