"""Small helpers for the local processes the project starts: free ports, bind checks, log tails."""

from __future__ import annotations

import socket
from collections import deque
from pathlib import Path


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_probe(host: str, port: int) -> int:
    """Bind ``host:port`` (0 = any) and release it; returns the port, raises OSError if taken."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # Servers bind with SO_REUSEADDR too: TIME_WAIT leftovers are no conflict, a listener is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound: int = sock.getsockname()[1]
        return bound


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on `host` right now (another process may still take it)."""
    return bind_probe(host, 0)


def port_is_free(host: str, port: int) -> bool:
    try:
        bind_probe(host, port)
    except OSError:
        return False
    return True


def connect_host(bind_host: str) -> str:
    """Where a client reaches a server bound to ``bind_host``: a wildcard bind address is not connectable."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)


def http_url(bind_host: str, port: int) -> str:
    """``http://host:port`` for a server bound to ``bind_host`` (IPv6 in brackets)."""
    host = connect_host(bind_host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip() or "<log is empty>"
    except OSError as exc:
        return f"<log unreadable: {exc!r}>"
