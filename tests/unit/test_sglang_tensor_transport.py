"""SGLang's tensor transport: the trainer end's shared buckets, its payloads read by another process, the transport.

The live SGLang-CPU server loading these payloads is tests/integration/test_sglang.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from atropos_verl.serving.errors import EngineError
from atropos_verl.serving.transports.sglang_tensor import SGLangTensorTransport, TensorStage, dump_named_tensors


def params(scale: float = 1.0):
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", scale * torch.randn(33, 5, generator=generator)),
        ("model.layers.0.self_attn.q_proj.weight", scale * torch.randn(5, 5, generator=generator)),
        ("model.norm.weight", scale * torch.randn(3, generator=generator)),
        ("lm_head.weight", scale * torch.randn(33, 5, generator=generator)),
    ]


def stage_params(stage: TensorStage, scale: float = 1.0, payloads: int = 1, dtype: str = "bfloat16", **kw):
    kw = {"bucket_bytes": 256, "device": "cpu", "writer": True, "tied_embeddings": True, **kw}
    return stage.stage(iter(params(scale)), dtype=dtype, payloads=payloads, **kw)


def test_stage_packs_views_into_shared_buckets_reused_by_every_version():
    stage = TensorStage()
    with pytest.raises(RuntimeError, match="no weights staged"):
        stage.payloads(1)
    first = stage_params(stage)
    # The tied lm_head is SGLang's to re-tie; everything else is cast to the engine's dtype.
    assert [name for name, _ in stage.views] == [name for name, _ in params()[:3]]
    assert first["tensors"] == 3 and first["bytes"] == (33 * 5 + 25 + 3) * 2
    assert len(first["payloads"]) == 1 and first["buckets"] == len(stage.buffers) > 1
    assert all(buffer.is_shared() for buffer in stage.buffers)
    for (name, view), (_, tensor) in zip(stage.views, params()):
        assert view.dtype == torch.bfloat16 and torch.equal(view, tensor.to(torch.bfloat16)), name
    pointers = [buffer.data_ptr() for buffer in stage.buffers]

    second = stage_params(stage, scale=2.0, payloads=2)
    assert [buffer.data_ptr() for buffer in stage.buffers] == pointers
    assert len(second["payloads"]) == 2 and torch.equal(stage.views[2][1], (2.0 * params()[2][1]).bfloat16())
    # Every rank walks the tensors; only the writer keeps buckets.
    other = TensorStage()
    assert stage_params(other, writer=False)["payloads"] == [] and other.buffers == []
    stage.release()
    assert stage.buffers == [] and stage.views == []


# A process that is no child of the sender, as SGLang's server is: it records every global the pickle
# names (SGLang's SafeUnpickler admits torch.*, builtins, collections, copyreg...) and sums the tensors.
READER = textwrap.dedent(
    """
    import base64, io, json, pickle, sys
    import torch

    modules = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            modules.add(module)
            return super().find_class(module, name)

    for payload in sys.stdin.read().split():
        named = Recording(io.BytesIO(base64.b64decode(payload, validate=True))).load()
        tensors = [[n, str(t.dtype), t.double().sum().item()] for n, t in named]
        print(json.dumps({"modules": sorted(modules), "tensors": tensors}))
    """
)


def test_payloads_open_in_an_unrelated_process_and_name_only_torch():
    stage = TensorStage()
    payloads = stage_params(stage, dtype="float32", payloads=2)["payloads"]
    try:
        done = subprocess.run(
            [sys.executable, "-c", READER], input=" ".join(payloads), capture_output=True, text=True, timeout=120
        )
    finally:
        stage.release()
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    want = [[name, "torch.float32", pytest.approx(tensor.double().sum().item())] for name, tensor in params()[:3]]
    assert len(answers) == 2 and all(answer["tensors"] == want for answer in answers)
    modules = set(answers[0]["modules"])
    assert modules and all(
        m == "torch" or m.startswith(("torch.", "builtins", "collections", "copyreg")) for m in modules
    )


def test_cpu_tensors_outside_shared_memory_still_dump_by_name():
    """torch moves a private CPU storage into file_system shared memory when it is pickled."""
    payload = dump_named_tensors([("w", torch.ones(3))])
    assert isinstance(payload, str) and payload
    # The scoped strategy is put back: the rest of the worker keeps torch's default.
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"


class Policy:
    def __init__(self):
        self.dumps = 0
        self.released = 0
        self.staged = []

    def _fresh(self, count):
        self.dumps += count
        return [f"payload-{self.dumps - count + i}" for i in range(count)]

    def stage_weights_tensors(self, bucket_bytes, dtype, payloads):
        self.staged.append((bucket_bytes, dtype))
        return {"payloads": self._fresh(payloads), "bytes": 10.0, "tensors": 2.0, "buckets": 1.0, "seconds": 0.0}

    def weights_tensor_payloads(self, count):
        return self._fresh(count)

    def release_weights_tensors(self):
        self.released += 1
        raise RuntimeError("workers already gone")


class Replica:
    def __init__(self, name, tp=1, delay=0.0):
        self.name, self.tensor_parallel_size, self.delay = name, tp, delay
        self.policy_version, self.loads = 0, []

    async def load_weights_tensors(self, payloads, version):
        await asyncio.sleep(self.delay)
        self.loads.append((version, list(payloads)))
        self.policy_version = version


def test_transport_gives_every_tp_rank_its_own_payload_restores_and_times_out():
    policy = Policy()
    transport = SGLangTensorTransport(policy, medium="shared_memory", dtype="bfloat16", receivers=1, timeout_s=0.2)
    assert transport.name == "shared_memory"

    async def scenario():
        with pytest.raises(EngineError, match="version 1 was not prepared"):
            await transport.push(1, [Replica("a")])
        assert (await transport.prepare(1)).bytes == 10.0
        one, two = Replica("one"), Replica("two", tp=2)
        # Three TP ranks, one payload staged: the transport asks the worker for two more.
        await transport.push(1, [one, two])
        assert one.loads == [(1, ["payload-0"])] and two.loads == [(1, ["payload-1", "payload-2"])]
        with pytest.raises(EngineError, match="version 1 was not prepared"):
            await transport.push(1, [one])
        restarted = Replica("two", tp=2)
        await transport.restore(restarted)
        assert restarted.loads == [(1, ["payload-3", "payload-4"])] and restarted.policy_version == 1
        await transport.prepare(2)
        with pytest.raises(EngineError, match="slow: weight sync of policy version 2 .*did not finish within 0.2s"):
            await transport.push(2, [Replica("slow", delay=5)])

    asyncio.run(scenario())
    assert policy.staged == [(512 << 20, "bfloat16")] * 2
    transport.close()
    assert policy.released == 1
    with pytest.raises(ValueError, match="medium"):
        SGLangTensorTransport(policy, medium="folder", dtype="bfloat16", receivers=1)


class DevicePolicy:
    def __init__(self, device):
        self.device = device


@pytest.mark.parametrize(
    ("device", "placement", "ray_resources", "setting", "expected"),
    [
        ("cpu", None, {}, "auto", "shared_memory"),
        ("cpu", None, {}, "folder", "folder"),
        ("cuda", (("0",), (("0",),)), {}, "auto", "cuda_ipc"),
        ("cuda", (("0",), (("1",),)), {}, "auto", "folder"),
        # A replica on a Ray node of its own does not share the trainer's GPU "0", whatever its name.
        ("cuda", (("0",), (("0",),)), {"replica_node": 1.0}, "auto", "folder"),
    ],
)
def test_service_picks_the_tensor_transport_for_sglang_by_placement(
    device, placement, ray_resources, setting, expected, tmp_path
):
    from atropos_verl.config import EngineConfig, ModelConfig
    from atropos_verl.placement import CPU_PLACEMENT, Placement
    from atropos_verl.serving.service import InferenceService
    from atropos_verl.serving.transports.folder import FolderTransport

    engine = EngineConfig(kind="sglang", weight_transport=setting, dtype="bfloat16", ray_resources=ray_resources)
    where = CPU_PLACEMENT if placement is None else Placement(trainer_gpus=placement[0], replica_gpus=placement[1])
    service = InferenceService(engine, ModelConfig(), "/nonexistent", "bfloat16", tmp_path, where)
    transport = asyncio.run(service._make_transport(DevicePolicy(device)))  # type: ignore[arg-type]
    if expected == "folder":
        assert isinstance(transport, FolderTransport)
    else:
        assert isinstance(transport, SGLangTensorTransport) and transport.name == expected
        assert transport.receivers == 1 and transport.dtype == "bfloat16"
    transport.close()
