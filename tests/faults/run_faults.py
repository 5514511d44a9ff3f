"""`make faults`: inject every fault into a CPU run and print the table.

python tests/faults/run_faults.py [scenario ...]      # default: all
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SCENARIOS, table  # noqa: E402


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="atropos-verl-faults-") as tmp:
        for name in names:
            print(f"== {name}", flush=True)
            results.append(SCENARIOS[name](Path(tmp)))
            print(table(results[-1:]), flush=True)
    print()
    print(table(results))
    ok = all(r.survived and r.groups_lost == 0 and r.groups_double_trained == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
