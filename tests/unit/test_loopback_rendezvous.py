"""The policy ranks' rendezvous store is served from 127.0.0.1 exactly when MASTER_ADDR is 127.0.0.1."""

import os
from datetime import timedelta

import psutil
import pytest
import torch

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
def rendezvous_env():
    """A clean rendezvous environment; whatever the function under test sets is undone afterwards.

    Restored by hand: monkeypatch.delenv records nothing for a variable that was absent, so one
    the function sets (TORCHELASTIC_USE_AGENT_STORE) would leak into later tests' processes.
    """
    saved = {name: os.environ.pop(name, None) for name in RENDEZVOUS_VARIABLES}
    os.environ.update(MASTER_PORT=str(free_port()), WORLD_SIZE="2", RANK="0")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.mark.parametrize("master_addr", ["::1", "localhost", "10.1.2.3", None])
def test_any_other_master_address_keeps_torchs_rendezvous(rendezvous_env, master_addr):
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = master_addr

    assert _loopback_rendezvous() is None
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert name not in os.environ, name


def test_other_ranks_join_as_clients_on_loopback(rendezvous_env):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["RANK"] = "1"

    assert _loopback_rendezvous() is None
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"


def listening_addresses(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def test_rank_zero_serves_the_store_on_127_0_0_1_only(rendezvous_env):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    port = int(os.environ["MASTER_PORT"])

    store = _loopback_rendezvous()
    assert listening_addresses(port) == {"127.0.0.1"}
    client = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=10))
    client.set("rank1", "joined")
    assert store.get("rank1") == b"joined"
    # The store owns its socket: it stops listening when it goes (no abort, no second close).
    del client, store
    assert listening_addresses(port) == set()
