"""What a colocated or split placement resolves to, and the errors for GPUs that are not there."""

import pytest

from atropos_verl.config import ConfigError, EngineConfig, TrainerConfig
from atropos_verl.placement import CPU_PLACEMENT, resolve_placement, visible_gpus

EIGHT = [str(i) for i in range(8)]


def engine(**overrides) -> EngineConfig:
    return EngineConfig(**{"kind": "vllm", **overrides})


def test_one_gpu_colocated_is_the_default():
    placement = resolve_placement(TrainerConfig(), engine(), "cuda", ["0"])
    assert placement.trainer_gpus == ("0",) and placement.replica_gpus == (("0",),)
    assert placement.colocated and placement.ray_visible_devices is None
    assert placement.replica_env(0) == {"CUDA_VISIBLE_DEVICES": "0"}


def test_colocated_replicas_take_the_trainers_gpus_in_tensor_parallel_slices():
    placement = resolve_placement(
        TrainerConfig(n_gpus_per_node=4), engine(replicas=2, tensor_parallel_size=2), "cuda", EIGHT
    )
    assert placement.trainer_gpus == ("0", "1", "2", "3")
    assert placement.replica_gpus == (("0", "1"), ("2", "3"))
    assert placement.replica_env(1) == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_split_puts_replicas_after_the_trainer_and_hides_them_from_ray():
    placement = resolve_placement(
        TrainerConfig(n_gpus_per_node=4), engine(placement="split", replicas=4), "cuda", EIGHT
    )
    assert placement.trainer_gpus == ("0", "1", "2", "3")
    assert placement.replica_gpus == (("4",), ("5",), ("6",), ("7",))
    assert not placement.colocated
    assert placement.ray_visible_devices == "0,1,2,3"


def test_split_on_named_gpus_uses_the_nodes_names():
    # CUDA_VISIBLE_DEVICES=2,3,6,7: the node's names, not 0..3, reach each replica.
    gpus = visible_gpus(4, {"CUDA_VISIBLE_DEVICES": "2,3,6,7"})
    placement = resolve_placement(
        TrainerConfig(n_gpus_per_node=2), engine(placement="split", gpus=[6, 7], tensor_parallel_size=2), "cuda", gpus
    )
    assert placement.trainer_gpus == ("2", "3") and placement.replica_gpus == (("6", "7"),)
    assert placement.ray_visible_devices == "2,3"


@pytest.mark.parametrize(
    ("trainer", "eng", "message"),
    [
        (TrainerConfig(n_gpus_per_node=4), engine(), "trainer.n_gpus_per_node: 4 GPUs asked for, 2 visible (0, 1)"),
        (TrainerConfig(), engine(replicas=2), "do not fit on the trainer's 1 GPU(s)"),
        (TrainerConfig(), engine(placement="split", gpus=[5]), "engine.gpus: 5 not among the visible GPUs (0, 1)"),
        (TrainerConfig(), engine(placement="split", gpus=[0, 1]), "engine.gpus: 0 also hold trainer ranks"),
        (TrainerConfig(), engine(placement="split", replicas=2), "need 2 GPUs, 1 given (1)"),
    ],
)
def test_a_placement_that_cannot_be_names_the_key(trainer, eng, message):
    with pytest.raises(ConfigError) as err:
        resolve_placement(trainer, eng, "cuda", ["0", "1"])
    assert message in str(err.value)


def test_cpu_and_external_engines_place_no_replica():
    assert resolve_placement(TrainerConfig(n_gpus_per_node=8), engine(), "cpu", []) is CPU_PLACEMENT
    placement = resolve_placement(TrainerConfig(), EngineConfig(kind="external"), "cuda", ["0"])
    assert placement.replica_gpus == () and placement.replica_env(0) == {}


def test_a_cluster_run_is_not_checked_against_this_nodes_gpus():
    placement = resolve_placement(TrainerConfig(n_gpus_per_node=8, nnodes=2), engine(), "cuda", ["0"])
    assert placement.trainer_gpus == ("0",)
