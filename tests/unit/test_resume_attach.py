"""A resumed run's first sync: the gateway stamps the checkpoint's version only once the replicas hold it."""

from __future__ import annotations

import asyncio

from atropos_verl.serving.transports.base import TransferStats


class Replica:
    """Stands in for a started replica: healthy, pausable, at the policy version it last loaded."""

    def __init__(self) -> None:
        self.name, self.policy_version = "replica-0", 0

    async def health(self) -> bool:
        return True

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass


class Transport:
    """Records the version the gateway stamped responses with while the checkpoint's weights were on their way."""

    name = "recording"

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.stamped_while_exporting: list[int] = []

    async def prepare(self, version: int) -> TransferStats:
        self.stamped_while_exporting.append(self.gateway.policy_version)
        return TransferStats(bytes=1.0, prepare_seconds=0.0)

    async def push(self, version: int, replicas) -> None:
        for replica in replicas:
            replica.policy_version = version

    def close(self) -> None:
        pass


def attach(tmp_path, version: int, resumed: bool) -> tuple[Transport, int, list[int]]:
    from atropos_verl.config import EngineConfig, ModelConfig
    from atropos_verl.serving.service import InferenceService

    engine = EngineConfig(kind="vllm", health_interval=3600)
    service = InferenceService(engine, ModelConfig(), "/base", "float32", tmp_path)
    service.replicas = [Replica()]
    transport = Transport(service.gateway)

    async def make_transport(policy):
        return transport

    service._make_transport = make_transport  # type: ignore[method-assign]

    async def scenario():
        await service.attach(object(), version, resumed=resumed)  # type: ignore[arg-type]
        service._monitor_task.cancel()
        return service.gateway.policy_version

    stamped = asyncio.run(scenario())
    return transport, stamped, [replica.policy_version for replica in service.replicas]


def test_resumed_replicas_are_stamped_with_the_checkpoint_version_only_after_loading_it(tmp_path):
    transport, stamped, held = attach(tmp_path, 2, resumed=True)
    # While the checkpoint's weights were exported the replicas served the base weights: version 0.
    assert transport.stamped_while_exporting == [0]
    assert stamped == 2 and held == [2]


def test_a_fresh_run_serves_its_base_weights_as_version_0_without_a_sync(tmp_path):
    transport, stamped, held = attach(tmp_path, 0, resumed=False)
    assert transport.stamped_while_exporting == []
    assert stamped == 0 and held == [0]
