"""Placing replicas and environments on Ray nodes: the config's checks and the start-up check against the cluster."""

import pytest

from atropos_verl.config import ConfigError, EnvSpec, RunConfig, load_config


def _nodes(*resources):
    return [{"NodeID": f"n{i}", "Alive": True, "Resources": {"CPU": 1.0, **r}} for i, r in enumerate(resources)]


def _placed(**engine):
    cfg = RunConfig()
    cfg.trainer.ray_address = "127.0.0.1:6379"
    cfg.engine.kind = "vllm"
    cfg.engine.ray_resources = engine
    return cfg


def test_placement_needs_a_cluster_to_join():
    with pytest.raises(ConfigError, match=r"^engine\.ray_resources: .*set trainer\.ray_address"):
        load_config({"engine": {"kind": "vllm", "ray_resources": {"node2": 1}}})
    env = {"name": "e", "module": "some.env", "ray_resources": {"node2": 1}}
    with pytest.raises(ConfigError, match=r"^data\.envs\[0\]\.ray_resources: "):
        load_config({"data": {"envs": [env]}})


def test_amounts_must_be_positive():
    with pytest.raises(ConfigError, match=r"^data\.envs\[0\]\.ray_resources\.node2: must be > 0"):
        EnvSpec(name="e", module="m", ray_resources={"node2": 0}).validate("data.envs[0]")


def test_joined_cluster_must_have_the_resource():
    from atropos_verl.ray_nodes import check_cluster_resources

    check_cluster_resources(_placed(node2=1), _nodes({}, {"node2": 2.0}))
    with pytest.raises(ConfigError, match=r"^engine\.ray_resources\.gpu_node: no node .* has a resource 'gpu_node'"):
        check_cluster_resources(_placed(gpu_node=1), _nodes({}, {"node2": 2.0}))
    # Each resource exists, but on different nodes: nothing can host the replica.
    with pytest.raises(ConfigError, match=r"^engine\.ray_resources: no single node"):
        check_cluster_resources(_placed(a=1, b=1), _nodes({"a": 1.0}, {"b": 1.0}))
    # A dead node's resources do not count.
    dead = _nodes({}, {"node2": 2.0})
    dead[1]["Alive"] = False
    with pytest.raises(ConfigError, match="has a resource 'node2'"):
        check_cluster_resources(_placed(node2=1), dead)
