"""Datasets as prompts with ground truths: loading, normalising to verl's format, preparing parquet files.

:mod:`atropos_verl.data.sources` reads and normalises rows (used by the dataset
environment, :mod:`atropos_verl.envs.dataset`); :mod:`atropos_verl.data.prepare`
writes verl-format parquet files from hub datasets or local files.
"""

from atropos_verl.data.sources import (
    TASKS,
    BadRow,
    Example,
    Fields,
    RenderedPrompt,
    SkipLog,
    SourceError,
    Task,
    load_rows,
    normalize,
    render_prompt,
    select,
    task_for,
)

__all__ = [
    "TASKS",
    "BadRow",
    "Example",
    "Fields",
    "RenderedPrompt",
    "SkipLog",
    "SourceError",
    "Task",
    "load_rows",
    "normalize",
    "render_prompt",
    "select",
    "task_for",
]
