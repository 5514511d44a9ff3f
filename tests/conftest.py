"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from atropos_verl.atropos import ApiServerProcess


@pytest.fixture
def atropos_api(tmp_path: Path) -> Iterator[ApiServerProcess]:
    """A fresh `run-api` on 127.0.0.1 and a free port; its state never leaks between tests."""
    server = ApiServerProcess.start(log_path=tmp_path / "run-api.log", ready_timeout_s=30)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The tiny random Llama (SmolLM2 tokenizer) built once into the project's model cache."""
    from atropos_verl.assets import tiny_llama

    return str(tiny_llama())


@pytest.fixture(scope="session")
def sglang_python() -> str:
    """SGLang's interpreter (its own venv, `make sglang-cpu`); the sglang-marked tests fail loudly without it."""
    import os

    from atropos_verl.serving.replicas.sglang import PYTHON_ENV

    python = os.environ.get(PYTHON_ENV)
    if not python or not Path(python).is_file():
        pytest.fail(f"{PYTHON_ENV} must name SGLang's python (run these tests with `make test-sglang`), got {python!r}")
    return python
