"""The fast part of the fault suite, run by `make test` (all of it: `make faults`)."""

import pytest
from harness import api_restart, bad_groups, queue_hazards

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_training_rides_out_an_api_restart(tmp_path):
    result = api_restart(tmp_path)
    assert result.survived, result
    assert result.groups_lost == 0 and result.groups_double_trained == 0, result
    assert "re-registered" in result.note


@pytest.mark.timeout(900)
def test_bad_groups_through_the_real_api_are_rejected_and_counted(tmp_path):
    result = bad_groups(tmp_path)
    assert result.survived, result
    assert result.groups_lost == 0 and result.groups_double_trained == 0, result


@pytest.mark.timeout(900)
def test_queue_hazards_are_refused_at_the_api_and_every_good_group_trains(tmp_path):
    result = queue_hazards(tmp_path)
    assert result.survived, result
    assert result.groups_lost == 0 and result.groups_double_trained == 0, result
