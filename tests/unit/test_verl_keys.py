"""verl's keys on the command line are answered with ours, before Hydra composes anything."""

import subprocess
import sys
from pathlib import Path

import pytest

from atropos_verl.verl_keys import GROUPS, VERL_KEYS, our_keys, unknown_override

REPO = Path(__file__).resolve().parents[2]


def test_every_mapped_key_exists_here():
    keys = set(our_keys())
    assert {ours for ours, _ in VERL_KEYS.values()} <= keys | set(GROUPS)


def test_a_verl_key_names_ours_with_a_ready_override():
    assert unknown_override(["model=dialogpt", "actor_rollout_ref.actor.optim.lr=1e-5"]) == (
        "actor_rollout_ref.actor.optim.lr is verl's key; here it is actor.lr: actor.lr=1e-5. "
        "README.md, 'verl keys', maps the others"
    )


def test_a_verl_key_of_another_unit_says_how_it_differs():
    line = unknown_override(["+data.train_batch_size=4"])
    assert line.startswith("data.train_batch_size is verl's key; the nearest here is trainer.batch_size (counts")
    assert "actor.num_mini_batches (a count" in unknown_override(["actor_rollout_ref.actor.ppo_mini_batch_size=8"])


def test_a_misspelt_key_gets_the_nearest_ones():
    assert unknown_override(["trainer.batchsize=8"]).startswith(
        "trainer.batchsize is not a key of this config; did you mean trainer.batch_size"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["model=dialogpt", "engine=vllm", "+experiment=demo", "--cfg", "job"],
        ["actor.lr=1e-5,1e-4", "hydra.run.dir=/tmp/x", "data.envs.0.args.env.source=/d", "~trainer.logger"],
        ["something_else_entirely=1"],
    ],
)
def test_our_keys_and_unrelated_words_pass(args):
    assert unknown_override(args) is None


def test_the_command_answers_in_a_second():
    result = subprocess.run(
        [sys.executable, "-m", "atropos_verl.train", "actor_rollout_ref.rollout.n=8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "configuration error: actor_rollout_ref.rollout.n is verl's key; the nearest here is data.group_size"
    ), result.stderr


def test_the_readme_table_lists_every_key():
    readme = (REPO / "README.md").read_text()
    for verl_key, (ours, _) in VERL_KEYS.items():
        assert f"| `{verl_key}` | `{ours}` |" in readme, verl_key
