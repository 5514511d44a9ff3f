"""The run directory belongs to one trainer at a time; checkpoints commit their progress record whole."""

import multiprocessing

import pytest

from atropos_verl.checkpoint import CheckpointDir, Progress, RunDirInUse, run_dir_lock


def _try_lock(run_dir, answers):
    try:
        with run_dir_lock(run_dir):
            answers.put("locked")
    except RunDirInUse as exc:
        answers.put(str(exc))


def test_a_second_trainer_on_the_same_run_dir_is_refused_until_the_first_is_gone(tmp_path):
    answers = multiprocessing.get_context("spawn").Queue()
    with run_dir_lock(tmp_path):
        other = multiprocessing.get_context("spawn").Process(target=_try_lock, args=(tmp_path, answers))
        other.start()
        message = answers.get(timeout=60)
        other.join(timeout=60)
    assert "is in use by trainer pid" in message and "trainer.run_dir" in message
    with run_dir_lock(tmp_path):
        pass


def test_commit_writes_the_progress_record_then_moves_the_pointer(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "checkpoints", keep=2)
    for step in (2, 4, 6):
        checkpoints.step_dir(step).mkdir(parents=True)
        checkpoints.commit(Progress(step=step, groups_trained_total=3 * step, groups_rejected_total=1))
    assert checkpoints.latest_step() == 6
    assert checkpoints.load_progress(6) == Progress(6, 18, 1)
    assert not checkpoints.step_dir(2).exists() and checkpoints.step_dir(4).exists()
    with pytest.raises(FileNotFoundError):
        checkpoints.load_progress(2)
