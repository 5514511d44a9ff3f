"""The policy ranks' rendezvous store is served from 127.0.0.1 exactly when MASTER_ADDR is 127.0.0.1."""

import os

import pytest

from atropos_verl.netutil import free_port
from atropos_verl.policy.worker import _loopback_rendezvous

RENDEZVOUS_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "TORCHELASTIC_USE_AGENT_STORE",
)


@pytest.fixture
def rendezvous_env(monkeypatch):
    """A clean rendezvous environment; whatever the function under test sets is undone afterwards."""
    for name in RENDEZVOUS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    return monkeypatch


@pytest.mark.parametrize("master_addr", ["::1", "localhost", "10.1.2.3", None])
def test_any_other_master_address_keeps_torchs_rendezvous(rendezvous_env, master_addr):
    if master_addr is not None:
        rendezvous_env.setenv("MASTER_ADDR", master_addr)

    assert _loopback_rendezvous() is None
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert name not in os.environ, name


def test_other_ranks_join_as_clients_on_loopback(rendezvous_env):
    rendezvous_env.setenv("MASTER_ADDR", "127.0.0.1")
    rendezvous_env.setenv("RANK", "1")

    assert _loopback_rendezvous() is None
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
