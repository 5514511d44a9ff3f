"""Why no batch forms: the reasoning over observations, and counting the groups environments drop."""

from pathlib import Path

import pytest

from atropos_verl.atropos.starvation import DropCounter, Observation, explain

# Lines as atroposlib 0.4.0's BaseEnv writes them into an environment's log (default logging format).
IDENTICAL = "WARNING:atroposlib.envs.base:Scores are the same in a group, skipping...\n"
TOO_LONG = "WARNING:atroposlib.envs.base:Token length is too long in a group, skipping...\n"
STATUS = (
    "INFO:atroposlib.envs.base:env_manager: Status dict: {'current_step': 0, 'queue_size': 0, "
    "'unallocated_fraction': 1.0, 'self_queue_size': 0, 'max_group_size': 1, 'env_weight': 1.0}\n"
)


def observation(**changes) -> Observation:
    base = dict(
        waited_s=60.0,
        batch_size=8,
        queued_groups=0,
        group_size=None,
        envs_started=1,
        envs_running=1,
        dropped={},
        api_error=None,
    )
    return Observation(**{**base, **changes})


def test_identical_scores_explain_an_empty_queue_and_suggest_the_fix():
    result = explain(observation(dropped={"identical_scores": 12, "too_long": 0}))
    assert result.reason == (
        "the API's queue is empty and the environments drop the groups they score; the environments' logs show "
        "groups dropped since the wait began: 12 for identical scores"
    )
    assert "--env.ensure_scores_are_not_same false" in result.hint
    assert "zero advantage" in result.hint


def test_group_sizes_that_cannot_fill_the_batch():
    result = explain(observation(queued_groups=5, group_size=3))
    assert result.reason == "groups of 3 sequences can never add up to trainer.batch_size=8 (5 groups queued)"
    assert "multiple of the environments' group size (3)" in result.hint


def test_too_few_sequences_queued_names_the_counts_and_the_dominant_drop():
    result = explain(observation(queued_groups=1, group_size=4, dropped={"identical_scores": 1, "too_long": 7}))
    assert result.reason.startswith("1 groups of 4 sequences queued (4 sequences), a batch needs 8")
    assert "7 for too long" in result.reason and "1 for identical scores" in result.reason
    assert "trainer.max_token_len" in result.hint


@pytest.mark.parametrize(
    "changes, start",
    [
        ({"queued_groups": None, "api_error": "GET /status failed"}, "the Atropos API does not answer (GET /status"),
        ({"envs_started": 0}, "no environment has sent a group: the run starts none"),
        ({"envs_started": 2, "envs_running": 1}, "1 of 2 environments are not running"),
        ({}, "no environment has sent a scored group yet"),
    ],
)
def test_other_reasons(changes, start):
    assert explain(observation(**changes)).reason.startswith(start)


def test_drop_counter_counts_lines_written_after_it_started(tmp_path: Path):
    log = tmp_path / "scripted-0.log"
    log.write_text(IDENTICAL * 3)
    counter = DropCounter(tmp_path)
    with log.open("a") as f:
        f.write(STATUS + IDENTICAL + TOO_LONG + IDENTICAL[:20])
    assert counter.update() == {"identical_scores": 1, "too_long": 1, "wrong_size": 0}
    # The line that was still being written counts once it is complete; a new log counts from its start.
    with log.open("a") as f:
        f.write(IDENTICAL[20:])
    (tmp_path / "other-0.log").write_text(IDENTICAL)
    assert counter.update()["identical_scores"] == 3


def test_drop_counter_without_a_log_folder():
    assert DropCounter(None).update() == {"identical_scores": 0, "too_long": 0, "wrong_size": 0}


HEADER = "=== environment scripted[0]: python -m atropos_verl.atropos.run_env ... serve\n"
REGISTERED = "INFO:atroposlib.envs.base:Initialized env with id 0: curr_step: 0, checkpoint_interval: 0\n"


def test_registrations_are_read_from_whole_logs_and_reset_by_a_restart(tmp_path: Path):
    (tmp_path / "a-0.log").write_text(HEADER + REGISTERED + STATUS)
    (tmp_path / "b-0.log").write_text(HEADER + STATUS)
    counter = DropCounter(tmp_path)
    # Registered before the wait began: still counted.
    assert counter.registered_count() == 1
    with (tmp_path / "b-0.log").open("a") as f:
        f.write(REGISTERED)
    with (tmp_path / "a-0.log").open("a") as f:
        f.write("Traceback ...\n" + HEADER)
    counter.update()
    assert counter.registered == {tmp_path / "a-0.log": False, tmp_path / "b-0.log": True}


def test_every_status_line_leads_with_the_same_counts():
    assert observation(envs_registered=1).status() == (
        "environments 1/1 running, 1 registered; queue 0 groups; no group received yet; batch 8 sequences"
    )
    assert observation(queued_groups=None, group_size=4, envs_started=0, envs_running=0).status() == (
        "environments 0/0 running; queue unknown; last group 4 sequences; batch 8 sequences"
    )
