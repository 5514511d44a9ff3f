"""Write a dataset as verl-format parquet: ``python -m atropos_verl.data.prepare NAME --out DIR``.

``NAME`` is ``gsm8k``, ``math`` or ``hellaswag`` (read from the hub unless
``--source`` names a local file or folder, or another hub dataset) or ``jsonl``
for any local rows, with ``--prompt-field`` / ``--answer-field`` /
``--data-source`` saying how to read them. Rows are normalised exactly as the
dataset environment normalises them (:mod:`atropos_verl.data.sources`), so
``DIR/<split>.parquet`` loads back through ``data=parquet`` unchanged, and bad
rows are skipped with a count and the first reasons.

Columns: ``data_source``, ``prompt`` (chat messages), ``ability``,
``reward_model`` (``{"style": "rule", "ground_truth": ...}``) and ``extra_info``
(``split``, ``index`` and, for plain rows, the question and worked answer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from atropos_verl.data.sources import Example, Fields, SourceError, load_rows, normalize, select
from atropos_verl.data.tasks import TASKS, BadRow


def prepare(
    name: str,
    out: Path,
    source: Optional[str] = None,
    split: str = "train",
    subset: Optional[str] = None,
    max_rows: int = 0,
    fields: Fields = Fields(),
) -> tuple[Path, int, str]:
    """Write ``out/<split>.parquet``; returns the path, the number of rows written and the skip summary."""
    task = TASKS.get(name)
    if task is None and name != "jsonl":
        raise ValueError(f"unknown dataset {name!r}: choose from {', '.join([*TASKS, 'jsonl'])}")
    if task is None and not source:
        raise ValueError("jsonl needs --source (a local .jsonl/.json/.parquet file or folder)")
    source = source or task.hub_path
    if subset is None and task is not None and source == task.hub_path:
        subset = task.hub_subset
    if task is not None and fields.data_source is None:
        fields = Fields(fields.prompt, fields.answer, task.data_source, fields.ability, fields.instruction)
    rows = load_rows(source, split, subset)

    def check(raw: Any, index: int) -> Example:
        example = normalize(raw, index, fields)
        if not example.data_source:
            raise BadRow("no data_source", "set --data-source (verl picks its reward function by it)")
        example.extra_info.setdefault("split", split)
        example.extra_info.setdefault("index", index)
        return example

    examples, skipped = select(rows, check, limit=max_rows)
    if not examples:
        raise SourceError(f"no usable rows in {source} (split {split}): {skipped.summary()}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.parquet"
    pq.write_table(pa.Table.from_pylist([example.to_verl_row() for example in examples]), path)
    return path, len(examples), skipped.summary()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atropos_verl.data.prepare",
        description="Write a dataset as verl-format parquet (DIR/<split>.parquet).",
    )
    parser.add_argument("name", choices=[*TASKS, "jsonl"], help="dataset kind; jsonl: any local rows")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--source", help="hub dataset name or local file/folder (default: the dataset's hub copy)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--subset", help="hub dataset config name (gsm8k's hub copy: main)")
    parser.add_argument("--max-rows", type=int, default=0, help="write at most this many rows (0: all)")
    parser.add_argument("--prompt-field", help="field holding the question (default: question, problem, prompt, ...)")
    parser.add_argument(
        "--answer-field", help="field holding the answer (default: answer, solution, ground_truth, ...)"
    )
    parser.add_argument("--data-source", help="verl data_source of every row (default: the dataset's, or the row's)")
    parser.add_argument("--ability", help="verl ability of every row")
    parser.add_argument("--instruction", help="appended to each question (default: the dataset's; '' for none)")
    args = parser.parse_args(argv)
    fields = Fields(args.prompt_field, args.answer_field, args.data_source, args.ability, args.instruction)
    try:
        path, written, skipped = prepare(
            args.name, args.out, args.source, args.split, args.subset, args.max_rows, fields
        )
    except (SourceError, ValueError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} rows to {path}; {skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
