"""A wheel built from the repository runs from any folder: the configs ship inside the package."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_an_installed_wheel_composes_its_configs(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    # A copy, so the build leaves no build/ or egg-info in the checkout.
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(tree)], check=True, timeout=240)
    [wheel] = (tmp_path / "dist").glob("atropos_verl-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # Dependencies come from this interpreter's site-packages as a plain path: its .pth files
    # (this checkout's editable install among them) are not processed, so only the wheel
    # provides atropos_verl.
    [venv_site] = venv.glob("lib/python*/site-packages")
    (venv_site / "_deps.pth").write_text(site.getsitepackages()[0] + "\n")
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import atropos_verl; print(atropos_verl.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(venv_site)), where
    job = subprocess.run(
        [str(venv / "bin" / "atropos-verl-train"), "model=dialogpt", "engine=vllm", "--cfg", "job"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    assert "path: microsoft/DialoGPT-medium" in job.stdout and "module: atropos_verl.envs.arithmetic" in job.stdout
    assert "kind: vllm" in job.stdout and "max_model_len: 1024" in job.stdout
