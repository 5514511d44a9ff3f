"""The SGLang adapter's launch command, environment, control calls and refusals.

Its live behaviour: tests/integration/test_sglang*.py (make test-sglang).
"""

import asyncio

import pytest

from atropos_verl.serving.replicas import EngineError, ReplicaSpec, SGLangReplica
from atropos_verl.serving.replicas import sglang as sglang_module


def spec(**overrides):
    return ReplicaSpec(model_path="/models/policy", served_model_name="policy", **overrides)


@pytest.fixture(params=[False, True], ids=["cpu", "cuda"])
def cuda(request, monkeypatch):
    monkeypatch.setattr(sglang_module, "_cuda_available", lambda: request.param)
    return request.param


def flags(cmd):
    """Flag -> value for the ``--flag value`` pairs after the launcher (bare flags map to None)."""
    out, args = {}, cmd[2:]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_command_runs_the_launcher_under_sglangs_interpreter(cuda):
    replica = SGLangReplica(
        spec(dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.3, tensor_parallel_size=2,
             extra_args=["--log-level", "warning"]),
        python="/venvs/sglang/bin/python",
    )  # fmt: skip
    cmd = replica.command(30001)
    assert cmd[0] == "/venvs/sglang/bin/python"
    assert cmd[1] == str(sglang_module.LAUNCHER) and sglang_module.LAUNCHER.is_file()
    f = flags(cmd)
    assert f["--model-path"] == "/models/policy" and f["--served-model-name"] == "policy"
    assert f["--host"] == "127.0.0.1" and f["--port"] == "30001"
    assert f["--dtype"] == "bfloat16" and f["--context-length"] == "4096" and f["--tp-size"] == "2"
    assert f["--weight-version"] == "0"
    # FA3 (SGLang's Hopper default) is never picked implicitly.
    assert f["--attention-backend"] == ("triton" if cuda else "torch_native")
    if cuda:
        assert f["--mem-fraction-static"] == "0.3" and "--device" not in f
    else:
        assert f["--device"] == "cpu" and "--disable-cuda-graph" in f and int(f["--max-total-tokens"]) >= 4096
    assert cmd[-2:] == ["--log-level", "warning"]
    assert "--enable-memory-saver" not in cmd


def test_attention_backend_is_configurable(cuda):
    replica = SGLangReplica(spec(), attention_backend="flashinfer")
    assert flags(replica.command(1))["--attention-backend"] == "flashinfer"


def test_interpreter_comes_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.setenv(sglang_module.PYTHON_ENV, "/opt/sgl/bin/python")
    assert SGLangReplica(spec()).command(1)[0] == "/opt/sgl/bin/python"
    assert SGLangReplica(spec(), python="/other/python").command(1)[0] == "/other/python"


def test_health_never_runs_a_generation_and_the_token_stays_off_argv(cuda):
    replica = SGLangReplica(spec(access_token="secret-token"))
    env = replica.environment()
    assert env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "0"
    assert env["ATROPOS_VERL_REPLICA_TOKEN"] == "secret-token"
    assert not any("secret-token" in arg for arg in replica.command(1))
    assert ("SGLANG_USE_CPU_ENGINE" in env) is (not cuda)


def test_sleep_mode_keeps_a_cpu_copy_of_the_weights(cuda):
    cmd = SGLangReplica(spec(enable_sleep_mode=True)).command(1)
    assert "--enable-memory-saver" in cmd and "--enable-weights-cpu-backup" in cmd


class Recorder:
    """Stands in for the HTTP server: records the control calls (the adapter's request building is pure)."""

    def __init__(self):
        self.calls = []

    async def request(self, method, path, *, params=None, body=None, timeout_s=None):
        self.calls.append((path, body))
        return {"success": True}


def recorded(replica):
    replica._server = Recorder()
    return replica._server.calls


def test_wake_up_resumes_exactly_what_sleep_released():
    replica = SGLangReplica(spec(enable_sleep_mode=True))
    calls = recorded(replica)
    asyncio.run(replica.wake_up())
    # Nothing released: resuming a tag that was never released kills SGLang's scheduler.
    assert [path for path, _ in calls] == ["/continue_generation"]
    calls.clear()
    asyncio.run(replica.sleep())
    asyncio.run(replica.sleep())
    # Queued work is aborted first (SGLang releases only when idle); a second sleep is a no-op.
    assert calls == [
        ("/pause_generation", {"mode": "abort"}),
        ("/release_memory_occupation", {"tags": ["kv_cache", "weights"]}),
    ]
    calls.clear()
    asyncio.run(replica.wake_up())
    assert calls == [("/resume_memory_occupation", {"tags": ["kv_cache", "weights"]}), ("/continue_generation", {})]


@pytest.mark.parametrize("mode,flush", [("abort", True), ("retract", False)])
def test_a_load_flushes_the_cache_only_after_an_abort_pause(tmp_path, mode, flush):
    (tmp_path / "model.safetensors").write_bytes(b"")
    replica = SGLangReplica(spec(), pause_mode=mode)
    calls = recorded(replica)
    asyncio.run(replica.pause())
    asyncio.run(replica.load_weights(str(tmp_path), 4))
    assert calls[0] == ("/pause_generation", {"mode": mode})
    assert calls[1] == (
        "/update_weights_from_disk",
        {"model_path": str(tmp_path.resolve()), "weight_version": "4", "flush_cache": flush},
    )
    assert replica.policy_version == 4


def test_a_failed_load_keeps_the_version_and_says_so(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    replica = SGLangReplica(spec())

    class Refusing(Recorder):
        async def request(self, method, path, **kwargs):
            return {"success": False, "message": "shape mismatch"}

    replica._server = Refusing()
    with pytest.raises(EngineError, match="(?s)shape mismatch.*mix of old and new weights"):
        asyncio.run(replica.load_weights(str(tmp_path), 1))
    assert replica.policy_version == 0


def test_sleep_without_memory_saver_is_refused_with_the_replica_name():
    replica = SGLangReplica(spec(), name="sglang-7")
    with pytest.raises(EngineError, match="sglang-7.*enable_sleep_mode"):
        asyncio.run(replica.sleep())


def test_unknown_dtype_and_pause_mode_are_refused():
    with pytest.raises(EngineError, match="unsupported dtype"):
        SGLangReplica(spec(dtype="int8"))
    with pytest.raises(EngineError, match="pause_mode must be abort or retract"):
        SGLangReplica(spec(), pause_mode="in_place")


def test_load_weights_needs_a_safetensors_folder(tmp_path):
    replica = SGLangReplica(spec())
    with pytest.raises(EngineError, match="no \\*.safetensors"):
        asyncio.run(replica.load_weights(str(tmp_path), 1))


def test_a_missing_interpreter_is_named_with_the_fix(tmp_path):
    replica = SGLangReplica(spec(), name="sglang-3", python=str(tmp_path / "no-python"))
    with pytest.raises(EngineError, match="sglang-3.*no-python does not exist.*make sglang-cpu"):
        asyncio.run(replica.start(5))
