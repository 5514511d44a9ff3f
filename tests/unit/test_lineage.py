"""Policy-version lineage: the gateway's bounded map and the trainer's staleness bound."""

import pytest

from atropos_verl.groups import GroupLimits, parse_group
from atropos_verl.serving.lineage import PolicyLineage, completion_runs
from atropos_verl.staleness import bound_staleness, group_version

LIMITS = GroupLimits(vocab_size=1000, max_token_len=64)


def group(completions, prompt=(1, 2, 3), group_id="g"):
    tokens = [list(prompt) + list(c) for c in completions]
    masks = [[-100] * len(prompt) + list(c) for c in completions]
    return parse_group({"tokens": tokens, "masks": masks, "scores": [0.0] * len(tokens)}, group_id, LIMITS)


def test_runs_are_the_trained_stretches_of_a_sequence():
    tokens = [1, 2, 10, 11, 3, 4, 12, 5]
    masks = [-100, -100, 10, 11, -100, -100, 12, -100]
    assert completion_runs(tokens, masks) == [[10, 11], [12]]


def test_a_served_completion_is_found_by_its_token_ids():
    lineage = PolicyLineage(capacity=10)
    lineage.record([10, 11, 12], version=4)
    assert lineage.sequence_version([1, 2, 10, 11, 12], [-100, -100, 10, 11, 12]) == 4
    # Another completion, a prefix of it, or one with a token changed: unknown.
    assert lineage.sequence_version([1, 2, 10, 11, 13], [-100, -100, 10, 11, 13]) is None
    assert lineage.sequence_version([1, 2, 10], [-100, -100, 10]) is None


def test_a_chat_template_closing_the_turn_still_matches():
    lineage = PolicyLineage(capacity=10)
    lineage.record([10, 11, 12], version=2)
    # The environment re-tokenized the text and the template appended end-of-turn + newline.
    assert lineage.run_version([10, 11, 12, 99, 98]) == 2
    assert lineage.run_version([10, 11, 12, 99, 98, 97]) is None


def test_a_multi_turn_sequence_is_as_old_as_its_oldest_turn_and_unknown_if_any_turn_is():
    lineage = PolicyLineage(capacity=10)
    lineage.record([10, 11], version=3)
    lineage.record([12], version=5)
    tokens = [1, 10, 11, 2, 12]
    assert lineage.sequence_version(tokens, [-100, 10, 11, -100, 12]) == 3
    assert lineage.sequence_version([1, 10, 11, 2, 13], [-100, 10, 11, -100, 13]) is None


def test_the_map_is_bounded_and_forgets_the_oldest_first():
    lineage = PolicyLineage(capacity=2)
    lineage.record([10], 0)
    lineage.record([11], 1)
    lineage.record([12], 2)
    assert len(lineage) == 2
    assert lineage.run_version([10]) is None
    assert lineage.run_version([11]) == 1 and lineage.run_version([12]) == 2


def test_the_same_completion_sampled_again_counts_as_the_newer_version():
    lineage = PolicyLineage(capacity=2)
    lineage.record([10], 0)
    lineage.record([11], 1)
    lineage.record([10], 3)
    lineage.record([12], 4)
    assert lineage.run_version([10]) == 3
    assert lineage.run_version([11]) is None


def test_a_group_is_as_old_as_its_oldest_known_sequence():
    lineage = PolicyLineage(capacity=10)
    lineage.record([10, 11], 2)
    lineage.record([12, 13], 4)
    assert group_version(group([[10, 11], [12, 13], [14, 15]]), lineage) == 2
    assert group_version(group([[14, 15]]), lineage) is None
    assert group_version(group([[10, 11]]), None) is None


@pytest.mark.parametrize("stale_groups", ["drop", "keep"])
def test_the_bound_drops_or_keeps_exactly_the_groups_older_than_it(stale_groups):
    lineage = PolicyLineage(capacity=10)
    for version, completion in enumerate([[10, 11], [12, 13], [14, 15], [16, 17]]):
        lineage.record(completion, version)
    groups = [group([c], group_id=f"g{i}") for i, c in enumerate([[10, 11], [12, 13], [14, 15], [16, 17], [18, 19]])]
    kept, report = bound_staleness(groups, lineage, policy_version=3, max_staleness=1, stale_groups=stale_groups)
    metrics = report.as_metrics()
    if stale_groups == "drop":
        assert [g.group_id for g in kept] == ["g2", "g3", "g4"]
        assert report.dropped == [3, 2]
        assert metrics["staleness/mean"] == 0.5 and metrics["staleness/max"] == 1
    else:
        assert [g.group_id for g in kept] == ["g0", "g1", "g2", "g3", "g4"]
        assert metrics["staleness/groups_kept_over_bound"] == 2
        assert metrics["staleness/max"] == 3
    assert metrics["staleness/unknown"] == 1


def test_without_a_bound_nothing_is_dropped_and_without_lineage_everything_is_unknown():
    groups = [group([[10, 11]]), group([[12, 13]])]
    kept, report = bound_staleness(groups, None, policy_version=7, max_staleness=0, stale_groups="drop")
    assert kept == groups
    assert report.as_metrics() == {"staleness/unknown": 2, "staleness/groups_kept_over_bound": 0}
    lineage = PolicyLineage(capacity=4)
    lineage.record([10, 11], 0)
    kept, report = bound_staleness(groups, lineage, policy_version=7, max_staleness=None, stale_groups="drop")
    assert kept == groups and report.trained == [7]
