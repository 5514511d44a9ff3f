"""The environment's own count of what it posted, for counting losses end to end.

Mixed into a test ``BaseEnv`` (before ``BaseEnv`` in the bases): when the variable
``ATROPOS_VERL_POST_LEDGER`` names a file, every post that atroposlib's sender finished
without raising appends one line with the number of groups it carried. The fault suite
compares the sum with what the trainer trained, rejected and left queued; the trainer's
own records (spool, lineage) play no part in it.
"""

from __future__ import annotations

import os

LEDGER_ENV = "ATROPOS_VERL_POST_LEDGER"


class PostLedger:
    async def _send_scored_data_to_api(self, scored_data):
        await super()._send_scored_data_to_api(scored_data)
        path = os.environ.get(LEDGER_ENV)
        if path:
            groups = len(scored_data) if isinstance(scored_data, list) else 1
            # One short line per write: appends from restarted env processes never interleave.
            with open(path, "a") as ledger:
                ledger.write(f"{groups}\n")


def posted_groups(path) -> int:
    """Groups an environment posted, from the ledger file at ``path`` (0 when none was written)."""
    try:
        with open(path) as ledger:
            return sum(int(line) for line in ledger if line.strip())
    except FileNotFoundError:
        return 0
