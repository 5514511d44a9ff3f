"""Datasets as prompts with ground truths: loading, normalising to verl's format, scoring, parquet files.

:mod:`atropos_verl.data.tasks` knows what each dataset's rows look like,
:mod:`atropos_verl.data.sources` reads and normalises rows and
:mod:`atropos_verl.data.scoring` scores answers (all used by the dataset environment,
:mod:`atropos_verl.envs.dataset`); :mod:`atropos_verl.data.prepare` writes
verl-format parquet files from hub datasets or local files.
"""

from atropos_verl.data.sources import (
    Example,
    Fields,
    RenderedPrompt,
    SkipLog,
    SourceError,
    load_rows,
    normalize,
    render_prompt,
    select,
)
from atropos_verl.data.tasks import TASKS, BadRow, Task, task_for

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
