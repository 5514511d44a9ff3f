"""A run across a two-node Ray cluster on this machine: replica and environment on node 2, policy ranks on both.

The test starts the cluster itself: ``ray start --head`` and a second node with a custom
resource ``node2`` (tests/ray_node.py: ``ray start --address`` refuses to join with cluster
mode off, the only mode that keeps a node on loopback), each with its own temp folder, token
authentication and loopback-only listeners, and stops both by PID. The trainer joins it
(``trainer.ray_address``) with a real run-api, the parity BaseEnv and a vLLM-CPU replica
placed on node 2 (``ray_resources``), and two gloo ranks (``trainer.nnodes=2``) that only
fit one per node. After step 1 the replica's server is killed on node 2: the trainer must see
it as it sees a local one and restart it there through a new host actor. Judged from outside:
metrics.jsonl (every step synced and proven), Ray's actor table (which node ran what), and the
listening sockets of every process involved.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from engine_runs import assert_every_step_synced
from procs import (
    REPO,
    base_overrides,
    cmdline,
    listening,
    listening_ports,
    processes_with_marker,
    run_tree,
    spawn,
    train_command,
    wait_exit,
)

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 3
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
NODE_UP_WITHIN_S = 120
VLLM_SERVER = "vllm.entrypoints.openai.api_server"


def _ray_env(folder: Path) -> dict[str, str]:
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # Ray's fixed default ports would collide with other Ray instances on this machine.
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
    }


def _cluster_state(address: str, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ray_node.py"), "state", address],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_run_across_two_ray_nodes(tmp_path):
    # Ray's socket paths must stay short: a folder of its own directly under /tmp.
    folder = Path(tempfile.mkdtemp(prefix="av-ray-", dir="/tmp"))
    marker = uuid.uuid4().hex
    ray_env = _ray_env(folder)
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    ray_bin = str(Path(sys.executable).parent / "ray")
    head_cmd = [
        ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--num-cpus=1", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--temp-dir={folder / 'head'}",
    ]  # fmt: skip
    node2_cmd = [
        sys.executable, str(REPO / "tests" / "ray_node.py"), "worker", address, str(folder / "node2"), "1",
        json.dumps({"node2": 2}),
    ]  # fmt: skip
    nodes, trainer = [], None
    try:
        nodes.append(spawn(head_cmd, tmp_path / "ray-head.log", marker, ray_env))
        deadline = time.monotonic() + NODE_UP_WITHIN_S
        while not listening(gcs_port):
            assert nodes[0].running and time.monotonic() < deadline, (tmp_path / "ray-head.log").read_text()[-3000:]
            time.sleep(0.5)
        nodes.append(spawn(node2_cmd, tmp_path / "ray-node2.log", marker, ray_env))
        while len([n for n in _cluster_state(address, ray_env)["nodes"].values() if n["alive"]]) < 2:
            assert nodes[1].running and time.monotonic() < deadline, (tmp_path / "ray-node2.log").read_text()[-3000:]
            time.sleep(1)
        node2 = next(
            node_id
            for node_id, node in _cluster_state(address, ray_env)["nodes"].items()
            if "node2" in node["resources"]
        )

        run_dir = tmp_path / "run"
        cmd = train_command(
            *base_overrides(free_port(), STEPS),
            "engine=vllm",
            "data=parity",
            "engine.dtype=float32",
            "engine.max_model_len=256",
            "engine.gpu_memory_utilization=0.4",
            "engine.sync_check_threshold=0.001",
            "engine.health_interval=2",
            f"engine.gateway_port={free_port()}",
            "+engine.ray_resources.node2=1",
            "+data.envs.0.ray_resources.node2=1",
            f"trainer.ray_address={address}",
            "trainer.nnodes=2",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        )
        log_path = tmp_path / "trainer.log"
        trainer = spawn(cmd, log_path, marker, ray_env)
        outside, checked, killed = {}, False, None
        deadline = time.monotonic() + 720
        while trainer.running and time.monotonic() < deadline:
            metrics_file = run_dir / "metrics.jsonl"
            if not checked and metrics_file.exists() and metrics_file.read_text().strip():
                # Everything up and trained once: what listens where, the cluster's own processes included.
                everything = [p for root in [trainer, *nodes] for p in run_tree(root.pid, marker)]
                ports = listening_ports(everything)
                outside = {port: holder for port, holder in ports.items() if holder.split()[0] not in LOOPBACK}
                checked = True
                servers = [p for p in processes_with_marker(marker) if VLLM_SERVER in cmdline(p)]
                assert len(servers) == 1, servers
                killed = servers[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(1)
        code = wait_exit(trainer, 5)
        log_text = log_path.read_text()
        assert code == 0, log_text[-6000:]
        state = _cluster_state(address, ray_env)
    finally:
        if trainer is not None:
            trainer.stop(timeout_s=60)
        for node in reversed(nodes):
            node.stop(timeout_s=60)
        shutil.rmtree(folder, ignore_errors=True)

    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert_every_step_synced(metrics, STEPS)
    assert checked and ports and not outside, outside
    assert killed is not None and metrics[-1]["sync/replicas_restarted"] == 1, metrics[-1]
    assert "restarted and serving policy version" in log_text
    hosts = [a for a in state["actors"] if a["class"] == "NodeHost"]
    # The environment's host actor and the replica's two (the first, then the restart's), all on node 2.
    assert len(hosts) == 3 and {a["node"] for a in hosts} == {node2}, state["actors"]
    ranks = [a for a in state["actors"] if "PolicyWorker" in a["class"]]
    assert len(ranks) == 2 and len({a["node"] for a in ranks}) == 2, state["actors"]
    assert f"on node {node2[:12]}" in log_text
