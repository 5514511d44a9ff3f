"""The batch spool: durable before training, replayed after a crash exactly where no checkpoint covers it."""

import math

from atropos_verl.spool import GroupSpool, lineage


def batch(tag):
    return [{"tokens": [[1, 2]], "masks": [[-100, 2]], "scores": [tag]}]


def test_fresh_spool_replays_nothing_and_keeps_nan(tmp_path):
    spool = GroupSpool(tmp_path / "spool.sqlite")
    assert spool.start_attempt(0) == []
    batch_id = spool.record([{"scores": [math.nan]}])
    spool.close()
    reopened = GroupSpool(tmp_path / "spool.sqlite")
    [(replayed_id, groups)] = reopened.start_attempt(0)
    assert replayed_id == batch_id and math.isnan(groups[0]["scores"][0])


def test_crash_replays_uncheckpointed_batches_in_fetch_order_and_lineage_is_exactly_once(tmp_path):
    path = tmp_path / "spool.sqlite"
    run1 = GroupSpool(path)
    run1.start_attempt(0)
    ids = [run1.record(batch(i)) for i in range(5)]
    for step, batch_id in enumerate(ids[:4], start=1):
        run1.mark_trained(batch_id, step)
        if step == 2:
            run1.checkpoint_committed(2)
    # Crash: batches 3 and 4 were trained after the last checkpoint, batch 5 fetched only.
    run1.close()

    run2 = GroupSpool(path)
    replay = run2.start_attempt(2)
    assert [batch_id for batch_id, _ in replay] == ids[2:]
    assert [groups[0]["scores"][0] for _, groups in replay] == [2, 3, 4]
    for step, (batch_id, _) in enumerate(replay, start=3):
        run2.mark_trained(batch_id, step)
    run2.checkpoint_committed(5)
    assert run2.pending() == 0
    run2.close()

    result = lineage(path)
    assert result.counts == {batch_id: 1 for batch_id in ids}
    assert result.groups_lost == 0 and result.groups_double_trained == 0


def test_lineage_detects_double_training(tmp_path):
    path = tmp_path / "spool.sqlite"
    spool = GroupSpool(path)
    spool.start_attempt(0)
    first = spool.record(batch(0))
    spool.mark_trained(first, 1)
    # A faulty resume from the checkpoint at step 1 that trains that batch again counts twice.
    assert spool.start_attempt(1) == []
    spool.mark_trained(first, 2)
    spool.close()
    result = lineage(path)
    assert result.counts == {first: 2}
    assert result.groups_double_trained == 1


def test_fetched_but_never_trained_counts_as_lost(tmp_path):
    path = tmp_path / "spool.sqlite"
    spool = GroupSpool(path)
    spool.start_attempt(0)
    spool.record(batch(0) * 3)
    spool.close()
    assert lineage(path).groups_lost == 3


def test_the_spool_shrinks_on_disk_as_checkpoints_land(tmp_path):
    path = tmp_path / "spool.sqlite"

    def on_disk():
        return sum(p.stat().st_size for p in (path, tmp_path / "spool.sqlite-wal") if p.exists())

    spool = GroupSpool(path)
    spool.start_attempt(0)
    big = [{"tokens": [list(range(4000))] * 8, "masks": [list(range(4000))] * 8, "scores": [0.0] * 8}]
    for step in range(1, 21):
        spool.mark_trained(spool.record(big), step)
    full = on_disk()
    spool.checkpoint_committed(20)
    assert spool.pending() == 0
    assert on_disk() < full / 10, (on_disk(), full)
