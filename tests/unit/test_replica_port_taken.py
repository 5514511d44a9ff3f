"""A replica's free port taken by another process before its server binds it (ServerReplica.start).

Seen in CI: one of Ray's agents, starting beside the vLLM replica, took the port vLLM was given and
answered the health route, vLLM died on the bind, and the replica's first control call got the
stranger's HTTP 405. Here the stranger is a plain HTTP server that answers /health; the replica's
server is a small real process that serves /health and /v1/models as an engine does.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from atropos_verl.netutil import free_port
from atropos_verl.serving.replicas import server as server_module
from atropos_verl.serving.replicas.base import EngineError, ReplicaSpec
from atropos_verl.serving.replicas.server import ServerReplica

SERVED = "the-policy"
ENGINE_SCRIPT = """
import http.server, json, sys
port, name = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": {}, "/v1/models": {"data": [{"id": name}]}}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body or {}).encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


class Stranger(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 405)
        self.end_headers()

    def log_message(self, *args):
        pass


class ScriptReplica(ServerReplica):
    engine = "script"

    def __init__(self, spec: ReplicaSpec, log_dir) -> None:
        super().__init__(spec, "script-0", log_dir, control_timeout_s=5)

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-c", ENGINE_SCRIPT, str(port), SERVED]

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def load_weights(self, weights_dir: str, version: int) -> None: ...

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        return []

    async def sleep(self, level: int = 1) -> None: ...

    async def wake_up(self) -> None: ...


@pytest.fixture
def stranger() -> Iterator[int]:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Stranger)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _picks(first: list[int]):
    """free_port as the replica calls it: ``first`` in order, then really free ports."""
    queue = list(first)
    return lambda host="127.0.0.1": queue.pop(0) if queue else free_port(host)


def test_a_taken_port_is_detected_and_the_server_started_on_another(stranger, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "free_port", _picks([stranger]))
    replica = ScriptReplica(ReplicaSpec(model_path="unused", served_model_name=SERVED), tmp_path)

    async def scenario() -> str:
        await replica.start(timeout_s=30)
        try:
            assert await replica.health()
            return replica.base_url
        finally:
            await replica.stop()

    with caplog.at_level(logging.WARNING):
        url = asyncio.run(scenario())
    assert not url.endswith(f":{stranger}")
    assert f"port {stranger} is answered by another process" in caplog.text


def test_a_port_taken_twice_is_a_named_error(stranger, tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "free_port", _picks([stranger, stranger]))
    replica = ScriptReplica(ReplicaSpec(model_path="unused", served_model_name=SERVED), tmp_path)
    with pytest.raises(EngineError, match=f"port {stranger} is answered by another process.*'{SERVED}'"):
        asyncio.run(replica.start(timeout_s=30))
    assert replica.pid is None
