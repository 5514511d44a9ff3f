"""The SGLang adapter's launch command and its refusals (no SGLang build runs here: see engines/sglang.py)."""

import asyncio

import pytest

from atropos_verl.serving.replicas import EngineError, ReplicaSpec, SGLangReplica


def spec(**overrides):
    return ReplicaSpec(model_path="/models/policy", served_model_name="policy", **overrides)


def test_command_maps_the_spec_to_sglang_flags():
    replica = SGLangReplica(
        spec(
            dtype="bfloat16",
            max_model_len=4096,
            gpu_memory_utilization=0.3,
            tensor_parallel_size=2,
            extra_args=["--log-level", "warning"],
        )
    )
    cmd = replica.command(30001)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--model-path"] == "/models/policy"
    assert flags["--served-model-name"] == "policy"
    assert flags["--host"] == "127.0.0.1"
    assert flags["--port"] == "30001"
    assert flags["--dtype"] == "bfloat16"
    assert flags["--context-length"] == "4096"
    assert flags["--mem-fraction-static"] == "0.3"
    assert flags["--tp-size"] == "2"
    assert cmd[-2:] == ["--log-level", "warning"]
    assert "--enable-memory-saver" not in cmd


def test_sleep_mode_turns_on_the_memory_saver():
    assert "--enable-memory-saver" in SGLangReplica(spec(enable_sleep_mode=True)).command(1)


def test_sleep_without_memory_saver_is_refused_with_the_replica_name():
    replica = SGLangReplica(spec(), name="sglang-7")
    with pytest.raises(EngineError, match="sglang-7.*enable_sleep_mode"):
        asyncio.run(replica.sleep())


def test_unknown_dtype_is_refused():
    with pytest.raises(EngineError, match="unsupported dtype"):
        SGLangReplica(spec(dtype="int8"))


def test_load_weights_needs_a_safetensors_folder(tmp_path):
    replica = SGLangReplica(spec())
    with pytest.raises(EngineError, match="no \\*.safetensors"):
        asyncio.run(replica.load_weights(str(tmp_path), 1))
