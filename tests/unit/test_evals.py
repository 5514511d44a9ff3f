"""Environment evaluation reports (atroposlib's evaluate_log files) → eval/* metrics, each report once."""

import json
import os

from atropos_verl.atropos.environments import env_command
from atropos_verl.atropos.evals import EvalReports
from atropos_verl.config import EnvSpec


def write_report(folder, metrics, stamp):
    """The layout BaseEnv.evaluate_log writes (lighteval's skeleton)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.json"
    path.write_text(json.dumps({"config_general": {}, "results": {"atropos|env_eval|0": metrics, "all": metrics}}))
    os.utime(path, ns=(stamp, stamp))


def test_each_report_is_read_once_and_named_eval(tmp_path):
    reports = EvalReports()
    reports.add(tmp_path / "a-0", "a")
    assert reports.new_metrics() == {}
    write_report(tmp_path / "a-0", {"eval/correct": 0.5, "score": 2, "note": "text", "bad": float("nan")}, 1)
    assert reports.new_metrics() == {"eval/correct": 0.5, "eval/score": 2.0}
    assert reports.new_metrics() == {}
    write_report(tmp_path / "a-0", {"eval/correct": 0.75}, 2)
    assert reports.new_metrics() == {"eval/correct": 0.75}


def test_several_environments_are_told_apart_and_a_half_written_file_waits(tmp_path):
    reports = EvalReports()
    reports.add(tmp_path / "a-0", "a")
    reports.add(tmp_path / "b-0", "b")
    write_report(tmp_path / "a-0", {"eval/correct": 1.0}, 1)
    (tmp_path / "b-0").mkdir()
    (tmp_path / "b-0" / "metrics.json").write_text('{"results": {"al')
    assert reports.new_metrics() == {"eval/a/correct": 1.0}
    write_report(tmp_path / "b-0", {"eval/correct": 0.0}, 2)
    assert reports.new_metrics() == {"eval/b/correct": 0.0}


def test_the_launcher_points_evaluations_at_the_run_and_an_env_may_override(tmp_path):
    spec = EnvSpec(name="e", script="env.py", args=["--env.data_dir_to_save_evals", "/mine"])
    cmd = env_command(spec, "http://api", "/m", None, eval_dir=tmp_path / "evals" / "e-0")
    flags = [i for i, arg in enumerate(cmd) if arg == "--env.data_dir_to_save_evals"]
    assert [cmd[i + 1] for i in flags] == [str(tmp_path / "evals" / "e-0"), "/mine"]
