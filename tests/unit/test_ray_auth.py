"""The local Ray instance the trainer starts listens on loopback only and requires its token."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

STARTER = textwrap.dedent(
    """
    import json, os, stat, subprocess, sys
    from atropos_verl.config import RunConfig
    from atropos_verl.placement import CPU_PLACEMENT
    from atropos_verl.policy.actor import ensure_ray
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    cfg = RunConfig()
    cfg.trainer.ray_num_cpus = 1
    local = ensure_ray(cfg, "cpu", CPU_PLACEMENT)
    from ray._private import ray_constants
    cluster_mode_restored = (
        ray_constants.ENABLE_RAY_CLUSTER and ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in os.environ
    )
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    address = ray.get_runtime_context().gcs_address
    # Without the token, but in Ray's cluster mode off as the trainer starts Ray: a stranger in
    # cluster mode swaps 127.0.0.1 for the host's address, where nothing listens, and never
    # reaches the token check.
    stranger_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    stranger_env[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    stranger = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={address!r})"],
        env=stranger_env, capture_output=True, text=True, timeout=90,
    )
    mode = get_authentication_mode()
    import psutil
    ray_processes = psutil.Process().children(recursive=True)
    listeners = sorted({
        f"{c.laddr.ip}:{c.laddr.port}"
        for p in ray_processes
        for c in (p.net_connections(kind="inet") if p.is_running() else [])
        if c.status == psutil.CONN_LISTEN
    })
    local.stop()
    print(json.dumps({
        "token_mode": mode == AuthenticationMode.TOKEN,
        "file_mode": oct(stat.S_IMODE(os.stat(token).st_mode)) if os.path.exists(token) else "removed",
        "address": address,
        "stranger_code": stranger.returncode,
        "stranger_refused": "Authentication" in stranger.stderr or "InvalidAuthToken" in stranger.stderr,
        "token_folder_left": os.path.exists(os.path.dirname(token)),
        "listeners": listeners,
        "cluster_mode_restored": cluster_mode_restored,
    }))
    """
)


@pytest.mark.timeout(240)
def test_local_ray_requires_a_token():
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    }
    done = subprocess.run([sys.executable, "-c", STARTER], env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["token_mode"]
    assert result["stranger_code"] != 0 and result["stranger_refused"], result
    # Every port Ray's processes listen on is on loopback (GCS, raylet, workers, agents).
    loopback = ("127.0.0.1:", "::ffff:127.0.0.1:", "::1:")
    assert result["listeners"] and all(addr.startswith(loopback) for addr in result["listeners"]), result
    assert result["address"].startswith("127.0.0.1:"), result
    # Ray's cluster mode is off only while the local instance starts; its listeners stay on loopback.
    assert result["cluster_mode_restored"], result
    # The token file (0600) goes with the instance.
    assert result["file_mode"] == "removed" and not result["token_folder_left"]
