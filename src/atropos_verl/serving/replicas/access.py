"""The run's replica token: only the trainer and its gateway may talk to an inference server.

vLLM's dev-mode routes (``/collective_rpc``, ``/pause``, ``/sleep``, ...) are open to any
local process, and its ``--api-key`` guards only ``/v1``-style paths. A replica started
with a token therefore loads :class:`RequireReplicaToken` (``--middleware``), which
refuses every request but ``/health`` that does not carry the token in
:data:`TOKEN_HEADER`; the token reaches the server in its environment
(:data:`TOKEN_ENV`), never on its command line. Runs inside the vLLM server process:
keep this module free of heavy imports.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

TOKEN_ENV = "ATROPOS_VERL_REPLICA_TOKEN"
TOKEN_HEADER = "X-Atropos-Verl-Replica-Token"
# Readiness and health probes carry no token, and the route reveals nothing.
OPEN_PATHS = ("/health",)
MIDDLEWARE = "atropos_verl.serving.replicas.access.RequireReplicaToken"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class RequireReplicaToken:
    """ASGI middleware: 401 for any HTTP request without the token (compared in constant time)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._expected = _digest(os.environ[TOKEN_ENV].encode())
        self._header = TOKEN_HEADER.lower().encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in OPEN_PATHS:
            supplied = next((value for name, value in scope["headers"] if name == self._header), b"")
            if not hmac.compare_digest(_digest(supplied), self._expected):
                await send(
                    {"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": b'{"error": "missing or wrong replica token"}'})
                return
        await self.app(scope, receive, send)
