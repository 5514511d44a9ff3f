"""Resume by re-running: trainer.resume_from names another run's checkpoint; this run's own latest wins."""

from pathlib import Path

import pytest

from atropos_verl.checkpoint import CheckpointDir, Progress, find_checkpoint
from atropos_verl.config import ConfigError, RunConfig, TrainerConfig
from atropos_verl.preflight import check_resume


def saved(run_dir: Path, *steps: int) -> CheckpointDir:
    checkpoints = CheckpointDir(run_dir / "checkpoints", None)
    for step in steps:
        checkpoints.step_dir(step).mkdir(parents=True)
        checkpoints.commit(Progress(step=step, groups_trained_total=step))
    return checkpoints


def test_a_step_folder_a_checkpoints_folder_or_a_run_folder_names_a_checkpoint(tmp_path):
    checkpoints = saved(tmp_path / "a", 2, 4)
    for path, latest in ((checkpoints.step_dir(2), 2), (checkpoints.root, 4), (tmp_path / "a", 4)):
        found, step = find_checkpoint(path)
        assert (found.root, step) == (checkpoints.root.resolve(), latest)


def test_a_folder_without_a_checkpoint_is_named_before_anything_starts(tmp_path):
    cfg = RunConfig(trainer=TrainerConfig(resume_from=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match=r"^trainer\.resume_from: .*nothing is not a checkpoint: expected a "):
        check_resume(cfg)


def test_the_runs_own_checkpoint_wins_over_resume_from(tmp_path):
    from atropos_verl.trainer import Trainer

    saved(tmp_path / "base", 6)
    trainer = Trainer(
        RunConfig(trainer=TrainerConfig(run_dir=str(tmp_path / "new"), resume_from=str(tmp_path / "base")))
    )
    assert trainer._resume_point() == 6 and trainer.progress.step == 6
    assert trainer.resume_source.root == (tmp_path / "base" / "checkpoints").resolve()
    # The resumed run saved its own checkpoint and was stopped: the same command continues it.
    saved(tmp_path / "new", 8)
    again = Trainer(RunConfig(trainer=TrainerConfig(run_dir=str(tmp_path / "new"), resume_from=str(tmp_path / "base"))))
    assert again._resume_point() == 8 and again.resume_source is again.checkpoints
