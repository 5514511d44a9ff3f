"""BatchSource against a real run-api: an API the run started that dies ends the wait at once."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from atropos_verl.atropos import ApiServerProcess, AtroposAPIError, AtroposClient, TrainerRegistration
from atropos_verl.atropos.batches import BatchSource
from atropos_verl.atropos.environments import EnvSupervisor
from atropos_verl.config import DataConfig
from atropos_verl.spool import GroupSpool

pytestmark = pytest.mark.timeout(90)

REGISTRATION = TrainerRegistration(
    wandb_group="g",
    wandb_project="p",
    batch_size=4,
    max_token_len=64,
    checkpoint_dir="/tmp/atropos-verl-test-ckpt",
    save_checkpoint_interval=0,
    starting_step=0,
    num_steps=10,
)


def test_owned_api_that_died_fails_the_wait_with_its_exit_and_log(atropos_api: ApiServerProcess, tmp_path: Path):
    async def scenario() -> None:
        client = AtroposClient(atropos_api.url, REGISTRATION, max_retries=1, retry_backoff_s=0.1)
        async with client:
            await client.register()
            source = BatchSource(
                client,
                GroupSpool(tmp_path / "spool.sqlite"),
                [],
                EnvSupervisor(DataConfig(), tmp_path / "envs"),
                batch_timeout_s=1800,
                retry_pause_s=0.2,
                api=atropos_api,
            )
            waiting = asyncio.create_task(source.next())
            await asyncio.sleep(1.0)
            assert not waiting.done()
            os.kill(atropos_api.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(AtroposAPIError) as err:
                await waiting
            assert time.monotonic() - started < 15
        message = str(err.value)
        assert "the API this run started is gone" in message
        assert "killed by signal SIGKILL" in message
        assert str(atropos_api.log_path) in message

    asyncio.run(scenario())
