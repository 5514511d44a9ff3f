"""A fault against a live SGLang-CPU replica (`make test-sglang`): it dies mid-run, is restarted and re-synced."""

import pytest
from harness import sglang_replica_crash

pytestmark = [pytest.mark.integration, pytest.mark.sglang]


@pytest.mark.timeout(900)
def test_training_rides_out_an_sglang_replica_crash(tmp_path, sglang_python):
    result = sglang_replica_crash(tmp_path, sglang_python)
    assert result.survived, result
    assert result.groups_lost == 0 and result.groups_double_trained == 0, result
