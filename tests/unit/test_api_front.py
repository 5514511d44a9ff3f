"""The front before run-api (atropos/front.py): against a real atroposlib `run-api`, no mocks.

Each hazard is first shown to break the bare run-api (the control), then refused by the front
with a reason while the good groups around it are batched; a batch whose reply is lost is served
again until the trainer acknowledges it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
import pytest
from test_atropos_client import _client, _group, _register_env

from atropos_verl.atropos import ApiServerProcess, AtroposAPIError, free_port
from atropos_verl.atropos.front import TrajectoryFront, queue_hazard

pytestmark = pytest.mark.timeout(60)

BATCH = 4


async def _post(url: str, path: str, raw: bytes, gzipped: bool = False) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Content-Encoding": "gzip"} if gzipped else {})}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.post(url + path, data=gzip.compress(raw) if gzipped else raw, headers=headers) as resp,
    ):
        return resp.status, json.loads(await resp.text())


def _nan_group() -> bytes:
    return b'{"tokens":[[1,2],[3,4]],"masks":[[-100,2],[-100,4]],"scores":[NaN,0.0]}'


@pytest.mark.parametrize(
    ("group", "field", "words"),
    [
        ({"tokens": [[1, 2]] * 3, "scores": [0.0] * 3}, "tokens", "3 sequences"),
        ({"tokens": [[1, 2]] * 8, "scores": [0.0] * 8}, "tokens", "8 sequences"),
        ({"tokens": [], "scores": []}, "tokens", "no sequences"),
        ({"tokens": [[1, 2]] * 2, "scores": [float("nan"), 0.0]}, "scores[0]", "finite"),
        ({"tokens": [[1, 2]] * 2, "scores": [0, 1], "advantages": [[0.0, float("inf")]] * 2}, "advantages[0][1]", ""),
        ({"tokens": [[1, 2]] * 2, "overrides": [{"t": float("-inf")}, {}]}, "overrides[0].t", ""),
        ([1, 2], "group", "JSON object"),
    ],
)
def test_queue_hazards_name_the_field(group: Any, field: str, words: str) -> None:
    hazard = queue_hazard(group, BATCH)
    assert hazard is not None and hazard[0] == field and words in hazard[1], hazard


@pytest.mark.parametrize("size", [1, 2, 4])
def test_groups_that_pack_into_the_batch_pass(size: int) -> None:
    assert queue_hazard(_group(size), BATCH) is None


def test_bare_run_api_stalls_on_a_group_larger_than_the_batch(atropos_api: ApiServerProcess) -> None:
    """The control: what the front prevents."""
    url = atropos_api.url

    async def scenario() -> None:
        async with _client(url, batch_size=BATCH) as client:
            await client.register()
            assert await client.get_batch() is None
            env_id = await _register_env(url)
            assert (await _post(url, "/scored_data", json.dumps(_group(8)).encode()))[0] == 200
            for i in range(4):
                await _post(url, "/scored_data", json.dumps(_group(2, env_id, first_token=10 * i)).encode())
            # Eight good sequences are queued, yet no batch ever forms behind the 8-group.
            assert await client.get_batch() is None
            assert (await client.status()).queue_size == 5

    asyncio.run(scenario())


def test_front_refuses_queue_hazards_and_batches_the_good_groups(atropos_api: ApiServerProcess) -> None:
    async def scenario() -> None:
        async with TrajectoryFront(atropos_api.url, "127.0.0.1", free_port(), BATCH) as front:
            url = front.url
            async with _client(url, batch_size=BATCH) as client:
                await client.register()
                assert await client.get_batch() is None  # environments may register once a trainer polled
                env_id = await _register_env(url)
                posts = [
                    json.dumps(_group(2, env_id, first_token=1)).encode(),
                    json.dumps(_group(8)).encode(),
                    _nan_group(),
                    json.dumps(_group(3)).encode(),
                    json.dumps(_group(2, env_id, first_token=20)).encode(),
                ]
                answers = [await _post(url, "/scored_data", raw, gzipped=i == 1) for i, raw in enumerate(posts)]
                assert [status for status, _ in answers] == [200, 400, 400, 400, 200], answers
                assert "posted group #2" in answers[1][1]["error"] and "8 sequences" in answers[1][1]["error"]
                assert "scores[0]" in answers[2][1]["error"]
                batch = await client.next_batch(deadline_s=10)
                assert batch is not None
                assert sorted(g["tokens"][0][0] for g in batch) == [1, 20]
                # A list post: the good group is queued, the bad one refused, both reported.
                status, answer = await _post(
                    url, "/scored_data_list", json.dumps([_group(4, first_token=40), _group(5)]).encode()
                )
                assert status == 200 and answer["groups_processed"] == 1 and "5 sequences" in answer["refused"][0]
                assert [g["tokens"][0][0] for g in await client.next_batch(deadline_s=10)] == [40]
            counters = front.take_counters()
            assert counters.rejected == 4 and len(counters.reasons) == 4
            assert front.take_counters().rejected == 0

    asyncio.run(scenario())


def test_a_batch_whose_reply_was_lost_is_served_again(atropos_api: ApiServerProcess) -> None:
    async def scenario() -> None:
        async with TrajectoryFront(atropos_api.url, "127.0.0.1", free_port(), BATCH) as front:
            url = front.url
            async with _client(url, batch_size=BATCH) as client:
                await client.register()
                assert await client.get_batch() is None  # environments may register once a trainer polled
                env_id = await _register_env(url)
                for i in range(4):
                    await _post(url, "/scored_data", json.dumps(_group(2, env_id, first_token=10 * i)).encode())
                # A reader that never acknowledges: as if the trainer's reply was lost in transit.
                async with aiohttp.ClientSession() as session:
                    async with session.get(url + "/batch") as resp:
                        lost = await resp.json()
                first = await client.next_batch(deadline_s=10)
                assert [g["tokens"] for g in first] == [g["tokens"] for g in lost["batch"]]
                second = await client.next_batch(deadline_s=10)
                assert second is not None
                seen = {g["tokens"][0][0] for g in first} | {g["tokens"][0][0] for g in second}
                assert seen == {0, 10, 20, 30}
                assert await client.get_batch() is None
            assert front.take_counters().batches_served_again == 1

    asyncio.run(scenario())


def test_front_on_a_taken_port_names_the_key() -> None:
    async def scenario() -> None:
        async with TrajectoryFront("http://127.0.0.1:9", "127.0.0.1", free_port(), BATCH) as first:
            with pytest.raises(OSError) as err:
                async with TrajectoryFront("http://127.0.0.1:9", "127.0.0.1", first.port, BATCH):
                    pass
        assert "atropos.api_url" in str(err.value) and str(first.port) in str(err.value)

    asyncio.run(scenario())


def test_front_reports_a_dead_run_api_as_502() -> None:
    async def scenario() -> None:
        async with TrajectoryFront(f"http://127.0.0.1:{free_port()}", "127.0.0.1", free_port(), BATCH) as front:
            async with _client(front.url, batch_size=BATCH, max_retries=0) as client:
                with pytest.raises(AtroposAPIError) as err:
                    await client.get_batch()
        assert "502" in str(err.value) and "did not answer" in str(err.value)

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["/scored_data", "/scored_data_list"])
def test_a_body_that_is_not_json_is_answered_400(path: str) -> None:
    """Refused by the front itself: nothing reaches run-api (none listens upstream here)."""

    async def scenario() -> None:
        async with TrajectoryFront(f"http://127.0.0.1:{free_port()}", "127.0.0.1", free_port(), BATCH) as front:
            status, answer = await _post(front.url, path, b'{"tokens": [[1, 2]')
            assert status == 400 and answer["error"].startswith("body is not JSON: "), answer
            assert front.take_counters().rejected == 0

    asyncio.run(scenario())
