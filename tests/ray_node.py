"""A Ray cluster node on this machine's loopback, and a look at a cluster's state, for the two-node test.

``worker ADDRESS TEMP_DIR NUM_CPUS RESOURCES_JSON`` joins the cluster at ADDRESS as one more node
and blocks until SIGTERM. It does what ``ray start --address`` does once its checks pass: that
command refuses to join with Ray's cluster mode off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and
with it on, Ray turns 127.0.0.1 into the host's outward address and its servers listen on every
interface. Cluster mode off keeps this node's address, and every listener, on 127.0.0.1.

``state ADDRESS`` prints the cluster's nodes and actors (dead ones included) as JSON.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from ray._private import ray_constants


def worker(address: str, temp_dir: str, num_cpus: int, resources: dict[str, float]) -> None:
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=address,
        node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        resources=resources,
        temp_dir=temp_dir,
        # One log monitor per machine: the head's.
        include_log_monitor=False,
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"node {node.node_id} joined {address}", flush=True)
    # Exiting runs the node's own shutdown (atexit), which stops the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)


def state(address: str) -> None:
    import ray

    ray.init(address=address, log_to_driver=False)
    nodes = {n["NodeID"]: {"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()}
    actors = [
        {"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
        for a in ray._private.state.actors().values()
    ]
    print(json.dumps({"nodes": nodes, "actors": actors}))


if __name__ == "__main__":
    assert not ray_constants.ENABLE_RAY_CLUSTER, "run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    command, address, *rest = sys.argv[1:]
    if command == "worker":
        worker(address, rest[0], int(rest[1]), json.loads(rest[2]))
    else:
        state(address)
