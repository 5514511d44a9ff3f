"""The design card's command, `python -m atropos_verl.train model=dialogpt engine=sglang` (and
`engine=vllm`), trains as it is.

Nothing else is configured: the default data source is the built-in arithmetic environment,
the lengths come from the dialogpt config (within its 1024 positions), the device is what
this machine has. Only the model is swapped for the tiny one (no hub here) and the run is
kept short; the API port is a free one so parallel runs do not meet. The SGLang case runs
with the live SGLang-CPU tests (`make test-sglang`), which install SGLang's own venv.
"""

import pytest
from procs import run_to_end, train_command

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["vllm", pytest.param("sglang", marks=pytest.mark.sglang)])
def test_the_design_card_command_trains_out_of_the_box(tmp_path, request, engine):
    run_dir = tmp_path / "run"
    # SGLang runs from its own venv; the fixture finds (or names how to build) its interpreter.
    engine_python = [f"engine.python={request.getfixturevalue('sglang_python')}"] if engine == "sglang" else []
    code, log = run_to_end(
        train_command(
            "model=dialogpt",
            f"engine={engine}",
            *engine_python,
            "model.path=builtin:tiny-llama",
            f"atropos.api_url=http://127.0.0.1:{free_port()}",
            "trainer.total_training_steps=2",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "trainer.progress_bar=false",
        ),
        tmp_path / "trainer.log",
        timeout=840,
    )
    assert code == 0, log[-6000:]
    assert "started environment arithmetic[0]" in log
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        # One group of the arithmetic environment's 8 answers per default batch of 8 sequences.
        assert m["data/groups"] == 1 and m["batch/sequences"] == 8, m
        assert m["sync/logprob_abs_diff"] < 0.05, m
    assert (run_dir / "checkpoints" / "global_step_2").is_dir()
