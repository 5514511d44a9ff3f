"""Ray's cluster mode is off only around the local ``ray.init``: the variable and the constant are restored."""

import os

import pytest
from ray._private import ray_constants

from atropos_verl.policy.actor import _environment_variable, _loopback_only_ray

VARIABLE = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR


@pytest.mark.parametrize("before", [None, "1"])
def test_cluster_mode_is_off_inside_and_as_before_after(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, before)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)

    with _loopback_only_ray():
        assert os.environ[VARIABLE] == "0"
        assert ray_constants.ENABLE_RAY_CLUSTER is False

    assert os.environ.get(VARIABLE) == before
    assert ray_constants.ENABLE_RAY_CLUSTER is True


def test_restored_when_ray_init_fails(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)

    with pytest.raises(RuntimeError, match="init failed"), _loopback_only_ray():
        raise RuntimeError("init failed")

    assert VARIABLE not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is True


def test_no_value_leaves_the_variable_as_it_is(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    with _environment_variable("CUDA_VISIBLE_DEVICES", None):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with _environment_variable("CUDA_VISIBLE_DEVICES", "1"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
