"""How far behind the trainer each group was sampled, and the bound ``trainer.max_staleness``.

A group's staleness is the policy version the trainer is about to update (its step
count before the update) minus the version that sampled the group, as the gateway's
lineage (:mod:`atropos_verl.serving.lineage`) recorded it; a group is as old as its
oldest sequence. 0 is strictly on-policy; with generation overlapping the update,
1 is the usual value. Groups whose sequences the gateway never served are unknown:
counted, never bounded (nothing says how old they are).

Over the bound a group is dropped (``stale_groups=drop``) and counted, or trained with
the rollout correction's importance weights (``stale_groups=keep``) and counted too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from atropos_verl.groups import ScoredGroup

logger = logging.getLogger(__name__)


class Lineage(Protocol):
    def sequence_version(self, tokens: Sequence[int], masks: Sequence[int]) -> Optional[int]: ...


def group_version(group: ScoredGroup, lineage: Optional[Lineage]) -> Optional[int]:
    """The oldest sampling version among the group's sequences; None when none of them is known."""
    if lineage is None:
        return None
    versions = [lineage.sequence_version(t, m) for t, m in zip(group.tokens, group.masks)]
    known = [v for v in versions if v is not None]
    return min(known) if known else None


@dataclass
class StalenessReport:
    trained: list[int] = field(default_factory=list)
    unknown: int = 0
    dropped: list[int] = field(default_factory=list)
    kept_over_bound: int = 0

    def as_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {
            "staleness/unknown": self.unknown,
            "staleness/groups_kept_over_bound": self.kept_over_bound,
        }
        if self.trained:
            metrics["staleness/mean"] = sum(self.trained) / len(self.trained)
            metrics["staleness/max"] = max(self.trained)
            metrics["staleness/min"] = min(self.trained)
        return metrics


def bound_staleness(
    groups: list[ScoredGroup],
    lineage: Optional[Lineage],
    policy_version: int,
    max_staleness: Optional[int],
    stale_groups: str,
) -> tuple[list[ScoredGroup], StalenessReport]:
    """The groups to train on at ``policy_version`` and what their staleness was (see the module doc)."""
    report = StalenessReport()
    kept = []
    for group in groups:
        version = group_version(group, lineage)
        if version is None:
            report.unknown += 1
            kept.append(group)
            continue
        staleness = policy_version - version
        if max_staleness is not None and staleness > max_staleness:
            if stale_groups == "drop":
                logger.warning(
                    "dropped %s: sampled by policy version %d, %d versions behind (trainer.max_staleness=%d)",
                    group.group_id,
                    version,
                    staleness,
                    max_staleness,
                )
                report.dropped.append(staleness)
                continue
            report.kept_over_bound += 1
        report.trained.append(staleness)
        kept.append(group)
    return kept, report
