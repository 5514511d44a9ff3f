"""Processes the run starts on other nodes of a Ray cluster: replicas and environments placed by resource.

``engine.ray_resources`` and ``data.envs[i].ray_resources`` name Ray resources (a node's
custom ones, ``ray start --resources='{"node2": 1}'``); each such process is started by a
small :class:`NodeHost` actor that asks for those resources (and no CPU: the process it
starts is accounted for as the local ones are, by nobody), so it lands on a node that has
them. The actor owns the child (a :class:`~atropos_verl.procs.ChildProcess` on its node:
own session, log file, stop by PID); the driver holds a :class:`RemoteChild`, which has the
same face, so the supervisor and the replica adapters treat remote and local processes alike.
A remote replica listens on its node's IP as Ray reports it (127.0.0.1 when every node of
the cluster is this machine's loopback), and the gateway routes to that URL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import ray

from atropos_verl.config import ConfigError, RunConfig
from atropos_verl.netutil import free_port, port_is_free
from atropos_verl.procs import ChildFailed, ChildProcess

# Every call to a host actor is bounded: a node that vanished must not hang the trainer.
_CALL_TIMEOUT_S = 120.0


class NodeHost:
    """Runs on the chosen node: starts one command there, answers for it, stops it by PID."""

    def __init__(self, label: str, log_path: str, tail_lines: int) -> None:
        self._child = ChildProcess(label, Path(log_path), tail_lines)

    def node(self) -> tuple[str, str]:
        """(node id, node IP) of the node this actor runs on."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        return free_port(host)

    def port_is_free(self, host: str, port: int) -> bool:
        return port_is_free(host, port)

    def start(self, cmd: list[str], overrides: dict[str, str], cwd: Optional[str], shown: list[str]) -> int:
        # The node's own environment (its paths, its Ray worker settings) under what the driver set.
        self._child.start(cmd, env={**os.environ, **overrides}, cwd=cwd, shown=shown)
        assert self._child.pid is not None
        return self._child.pid

    def returncode(self) -> Optional[int]:
        return self._child.returncode()

    def exit_status(self) -> Optional[str]:
        return self._child.exit_status()

    def tail(self, lines: Optional[int]) -> str:
        return self._child.tail(lines)

    def stop(self, timeout_s: float) -> None:
        self._child.stop(timeout_s)


class RemoteChild(ChildProcess):
    """A :class:`ChildProcess` whose process runs on a Ray node that has ``resources``.

    Each start places a fresh :class:`NodeHost`; each stop stops the process by PID through
    it and then ends the actor, so a restarted replica or environment goes through a new one.
    """

    def __init__(self, label: str, log_path: Path, resources: dict[str, float], tail_lines: int = 40) -> None:
        super().__init__(label, log_path, tail_lines)
        self.resources = dict(resources)
        self._host: Any = None
        self._pid: Optional[int] = None
        self.node_id: Optional[str] = None
        self.node_ip: Optional[str] = None

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(getattr(self._host, method).remote(*args), timeout=_CALL_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            raise ChildFailed(f"{self.label}: its host actor on node {self.node_id} failed: {exc}") from exc

    def place(self) -> str:
        """Start the host actor (if none runs) and return its node's IP."""
        if self._host is None:
            self._host = (
                ray.remote(NodeHost)
                .options(num_cpus=0, resources=self.resources, max_concurrency=4)
                .remote(self.label, str(self.log_path), self.tail_lines)
            )
            self.node_id, self.node_ip = self._call("node")
        assert self.node_ip is not None
        return self.node_ip

    def free_port(self, host: str) -> int:
        self.place()
        return int(self._call("free_port", host))

    def port_is_free(self, host: str, port: int) -> bool:
        # With no host actor nothing of ours holds the port: stop() ends the actor only after
        # the process's whole group is gone.
        return self._host is None or bool(self._call("port_is_free", host, port))

    def __repr__(self) -> str:
        where = f" on node {self.node_id[:12]} ({self.node_ip})" if self.node_id else ""
        return f"{self.label}{where}" + (f" (pid {self._pid})" if self._pid is not None else "")

    @property
    def pid(self) -> Optional[int]:
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None and self.exit_status() is None

    def start(
        self,
        cmd: Sequence[str],
        env: Optional[dict[str, str]] = None,
        cwd: str | os.PathLike[str] | None = None,
        shown: Optional[Sequence[str]] = None,
    ) -> None:
        """Start ``cmd`` on the node; ``env`` travels as what it changes of this process's environment."""
        self.place()
        overrides = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        # Relative paths in commands (an environment's script) mean the trainer's folder.
        where = str(cwd) if cwd is not None else os.getcwd()
        self._pid = int(self._call("start", list(cmd), overrides, where, list(shown if shown is not None else cmd)))

    def returncode(self) -> Optional[int]:
        return self._call("returncode") if self._host is not None else None

    def exit_status(self) -> Optional[str]:
        return self._call("exit_status") if self._host is not None else "not started"

    def tail(self, lines: Optional[int] = None) -> str:
        if self._host is None:
            return f"{self.label}: not started"
        return str(self._call("tail", lines))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the process by PID on its node, then the host actor; idempotent."""
        if self._host is None:
            return
        try:
            self._call("stop", timeout_s)
        finally:
            ray.kill(self._host)
            self._host = None
            self._pid = None


def placed_processes(cfg: RunConfig) -> list[tuple[str, dict[str, float]]]:
    """(config key, Ray resources) of every process the run places on a Ray node."""
    placed = [("engine.ray_resources", cfg.engine.ray_resources)] if cfg.engine.ray_resources else []
    placed += [(f"data.envs[{i}].ray_resources", env.ray_resources) for i, env in enumerate(cfg.data.envs)]
    return [(key, resources) for key, resources in placed if resources]


def check_cluster_resources(cfg: RunConfig, nodes: list[dict[str, Any]]) -> None:
    """ConfigError naming the key when no alive node of ``nodes`` (``ray.nodes()``) has what a process asks for."""
    alive = [node for node in nodes if node.get("Alive")]
    known = sorted({name for node in alive for name in node["Resources"] if not name.startswith("node:")})
    for key, resources in placed_processes(cfg):
        for name, amount in resources.items():
            if name not in known:
                raise ConfigError(
                    f"{key}.{name}: no node of the Ray cluster at {cfg.trainer.ray_address} has a resource "
                    f"{name!r} (its resources: {', '.join(known)}); start the node that should run it with "
                    f"ray start --resources='{{\"{name}\": 1}}'"
                )
        if not any(all(node["Resources"].get(n, 0) >= a for n, a in resources.items()) for node in alive):
            raise ConfigError(
                f"{key}: no single node of the Ray cluster has all of {resources} (per node: "
                + "; ".join(str({n: node["Resources"].get(n, 0) for n in resources}) for node in alive)
                + ")"
            )
