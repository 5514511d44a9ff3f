"""One rank of the policy: verl's FSDP2 ``TrainingWorker`` with our engine, dispatch and weight export.

Runs inside a Ray worker process; the driver side is :mod:`atropos_verl.policy.actor`.
"""

from __future__ import annotations

import os
from itertools import chain
from typing import TypeVar

import ray
import torch
from tensordict import NonTensorData, TensorDict
from torch.distributed.tensor import DTensor
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.metric.utils import Metric
from verl.workers.config import TrainingWorkerConfig
from verl.workers.engine_workers import TrainingWorker

# Registers verl's "cpu" platform in this process whether or not the package's
# verl.plugins entry point is installed (e.g. a source checkout on PYTHONPATH).
import atropos_verl.policy.platform_cpu  # noqa: F401
from atropos_verl.modelinfo import ties_word_embeddings
from atropos_verl.policy.rows import BatchArrays, cuts_by_offsets, split_rows
from atropos_verl.serving.transports.cuda_ipc import IpcStage, gpu_uuid
from atropos_verl.serving.transports.folder import write_weights
from atropos_verl.serving.transports.nccl import NcclSender, build_manifest
from atropos_verl.serving.transports.sglang_nccl import UpdateGroup
from atropos_verl.serving.transports.sglang_tensor import TensorStage
from atropos_verl.serving.transports.shared_memory import SharedMemoryStage

Stage = TypeVar("Stage", IpcStage, TensorStage, SharedMemoryStage)


def _dispatch_rows_by_data_parallel_rank(worker_group, batch: TensorDict):
    """Each worker's share of ``batch``: its data-parallel rank's consecutive rows, as :class:`BatchArrays`.

    The same shares as verl's dispatch for ``train_mini_batch``, whose generic
    chunking re-nests every row and puts each share through a thread pool even
    when there is one rank, and which sends TensorDicts through torch's
    serialiser. On a 2-core CPU, 32 x 1,024 tokens took 15-28 ms from the
    driver's call to the worker's first line that way, ~5 ms this way.
    """
    if "train" not in worker_group._dispatch_info:
        worker_group._dispatch_info["train"] = worker_group._query_dispatch_info("train")
    rank_of_worker = worker_group._dispatch_info["train"]
    ranks = max(rank_of_worker) + 1
    if ranks == 1:
        shares = [batch]
    elif cuts_by_offsets(batch):
        shares = split_rows(batch, ranks, copy=True)
    else:
        shares = tu.chunk_tensordict(batch, ranks)
    shares = [BatchArrays.from_tensordict(share) or share for share in shares]
    if worker_group.world_size > 1:
        # Serialise each share once, however many workers (e.g. Ulysses ranks) receive it.
        shares = [ray.put(share) for share in shares]
    return ([shares[rank] for rank in rank_of_worker],), {}


ROWS_BY_DATA_PARALLEL_RANK = {
    "dispatch_fn": _dispatch_rows_by_data_parallel_rank,
    "collect_fn": make_nd_compute_dataproto_dispatch_fn(mesh_name="train")["collect_fn"],
}


# The address rank 0's rendezvous store is served on when the ranks run on a loopback-only node.
LOOPBACK_STORE_HOST = "127.0.0.1"


def _loopback_rendezvous():
    """On a loopback-only node, host the ranks' rendezvous store on 127.0.0.1 (it listens on every interface otherwise).

    torch's env:// rendezvous starts its TCPStore server on rank 0 bound to all
    interfaces whatever ``MASTER_ADDR`` says. When the address is 127.0.0.1 (the local Ray
    instance the trainer starts, ``policy.actor``), rank 0 serves the store from a socket
    bound to 127.0.0.1 and every rank, rank 0 included, joins it as a client (torch's
    agent-store mode); gloo and NCCL keep their own connections on the loopback
    interface. Any other address, ``::1`` and ``localhost`` included (clients could resolve
    them to an IPv6 socket the store does not serve), keeps torch's own rendezvous.
    Returns rank 0's store (it must stay alive), or None.
    """
    import socket
    from datetime import timedelta

    if os.environ.get("MASTER_ADDR") != LOOPBACK_STORE_HOST:
        return None
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK_STORE_HOST, int(os.environ["MASTER_PORT"])))
    listener.listen(128)
    # The store owns the socket from here on and closes it when it goes: a Python socket
    # object closed first would end the store's server thread (an abort), or close it twice.
    return torch.distributed.TCPStore(
        LOOPBACK_STORE_HOST,
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=True,
        timeout=timedelta(minutes=10),
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=listener.detach(),
        use_libuv=False,
    )


class PolicyWorker(TrainingWorker):
    """verl's TrainingWorker on our engine (atropos_verl.policy.fsdp_engine), prepared to also run on the CPU platform.

    verl builds the process group as ``cpu:gloo,<device>:<backend>``, which torch
    rejects when the device is the CPU itself: creating the gloo group first (verl
    skips its own when one exists) fixes that without touching verl. verl registers
    its FSDP engine for accelerators only; ours is registered for whatever device
    this worker runs on.
    """

    def __init__(self, config: TrainingWorkerConfig, device: str):
        self._rendezvous = _loopback_rendezvous()
        if device == "cpu":
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(
                    backend="gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
                )
        from atropos_verl.policy.fsdp_engine import use_policy_engine
        from atropos_verl.policy.logprobs import install

        use_policy_engine()
        install()
        super().__init__(config)

    @register(dispatch_mode=ROWS_BY_DATA_PARALLEL_RANK, blocking=False)
    def train_mini_batch(self, data: TensorDict | BatchArrays) -> TensorDict | None:
        """``num_mini_batch`` optimizer steps over consecutive row ranges of ``data``, as verl's ``train_mini_batch``.

        verl's version selects each mini-batch row by row (re-nesting every jagged
        row) and gathers token counts as Python objects even on one rank, all
        before the GPU gets its first kernel. One pass (``epochs=1``) in order is
        what the Actor asks for; anything else goes to verl's version.
        """
        if isinstance(data, BatchArrays):
            data = data.to_tensordict()
        num_mini_batches = tu.get_non_tensor_data(data, "num_mini_batch", None)
        if (
            num_mini_batches is None
            or tu.get_non_tensor_data(data, "mini_batch_size", None) is not None
            or tu.get_non_tensor_data(data, "epochs", 1) != 1
            or tu.get_non_tensor_data(data, "dataloader_kwargs", None)
            or not cuts_by_offsets(data)
        ):
            return super().train_mini_batch(data)
        disable_auto_offload = tu.pop(data, key="disable_auto_offload", default=False)
        for key in ("num_mini_batch", "epochs", "seed", "dataloader_kwargs"):
            tu.pop(data, key=key, default=None)
        mini_batches = split_rows(data, num_mini_batches)
        outputs = []
        with self.engine.train_mode(disable_auto_offload=disable_auto_offload):
            for index, mini_batch in enumerate(mini_batches):
                tu.assign_non_tensor(
                    mini_batch,
                    global_token_num=NonTensorData(self._global_token_num(mini_batch)),
                    update_lr_scheduler=index == len(mini_batches) - 1,
                    disable_auto_offload=True,
                )
                with torch.profiler.record_function(f"mini_batch{index}"):
                    outputs.append(self.train_batch(mini_batch))
                self.profiler.step()
        if not self.engine.is_mp_src_rank_with_outputs():
            return None
        metrics: dict[str, list] = {}
        for output in outputs:
            for key, value in tu.get(output, "metrics").items():
                if isinstance(value, list):
                    # One entry per data-parallel rank: verl's reduction over ranks.
                    value = (
                        Metric.aggregate_dp(value) if isinstance(value[0], Metric) else list(chain.from_iterable(value))
                    )
                metrics.setdefault(key, []).append(value)
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics}).cpu()

    def _global_token_num(self, mini_batch: TensorDict) -> list[int]:
        """Sequence lengths of this mini-batch on every data-parallel rank (verl's MFU estimate reads them)."""
        lengths = mini_batch["input_ids"].offsets().diff().tolist()
        group = self.engine.get_data_parallel_group()
        ranks = torch.distributed.get_world_size(group)
        if ranks == 1:
            return lengths
        gathered = [None] * ranks
        torch.distributed.all_gather_object(gathered, lengths, group)
        return [length for rank_lengths in gathered for length in rank_lengths]

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_reference(self, path: str, attn_implementation: str, trust_remote_code: bool) -> None:
        """Hold a frozen reference model next to the policy (atropos_verl.policy.reference)."""
        from atropos_verl.policy.fsdp_engine import _device
        from atropos_verl.policy.reference import load_reference

        self.engine.reference = load_reference(path, _device(), attn_implementation, trust_remote_code)

    def _full_tensors(self):
        """Every weight as (HF name, full tensor): verl's per-tensor generator, or on one rank the shards themselves.

        On a single rank each FSDP2 shard already is the whole tensor, yet verl's generator
        runs a one-rank all-gather per tensor (DTensor dispatch and a collective each; the
        stage of a 0.5B sync took ~45 ms on the H200). LoRA, parameter offload and QAT keep
        verl's path, as do several ranks.
        """
        engine = self.engine
        inner = getattr(engine.module, "_fsdp_wrapped_module", engine.module)
        if (
            torch.distributed.get_world_size() > 1
            or getattr(engine, "_is_offload_param", True)
            or getattr(engine, "_qat_enabled", False)
            or hasattr(inner, "peft_config")
        ):
            return engine.get_per_tensor_param()[0]
        from verl.utils.model import convert_weight_keys
        from verl.workers.engine.fsdp.utils import unfuse_moe_params

        def whole(tensor):
            if isinstance(tensor, DTensor):
                local = tensor.to_local()
                return local if local.shape == tensor.shape else tensor.full_tensor()
            return tensor

        state = convert_weight_keys(engine.module.state_dict(), inner)
        model_type = engine.model_config.hf_config.model_type
        return unfuse_moe_params(((name, whole(t)) for name, t in state.items()), model_type)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_weights(self, out_dir: str, bucket_bytes: int, dtype: str) -> dict[str, float]:
        """Write the full policy into ``out_dir`` in the folder transport's format; rank 0 writes.

        Every rank walks the per-tensor generator because each full tensor is an
        all-gather of FSDP shards (``_full_tensors``).
        """
        per_tensor = self._full_tensors()
        return write_weights(
            per_tensor,
            out_dir,
            bucket_bytes=bucket_bytes,
            dtype=dtype,
            writer=self.rank == 0,
            tied_embeddings=ties_word_embeddings(self.model_config.hf_config),
        )

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_adapter(self, out_dir: str, dtype: str) -> dict[str, float]:
        """Write the LoRA adapter into ``out_dir`` as a PEFT folder (atropos_verl.policy.lora); rank 0 writes."""
        from atropos_verl.policy.lora import write_adapter

        return write_adapter(self.engine.module, out_dir, writer=self.rank == 0, dtype=dtype)

    def _stage(self, kind: type[Stage]) -> Stage:
        """This worker's stage of one transport (IPC, SGLang tensors, shared memory): it owns the buckets."""
        stages = self.__dict__.setdefault("_stages", {})
        if kind not in stages:
            stages[kind] = kind()
        return stages[kind]

    def _release_stage(self, kind: type[Stage]) -> None:
        stage = self.__dict__.get("_stages", {}).pop(kind, None)
        if stage is not None:
            stage.release()

    def _writer(self) -> dict[str, bool]:
        """Every rank walks the per-tensor generator (each full tensor is an all-gather); rank 0 alone keeps a copy."""
        return {"writer": self.rank == 0, "tied_embeddings": ties_word_embeddings(self.model_config.hf_config)}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage_weights_ipc(self, bucket_bytes: int, dtype: str) -> dict:
        """Copy the full policy into rank 0's reusable GPU buckets; its answer holds the IPC updates.

        Only rank 0 keeps buckets, so only its GPU can be read by a colocated replica.
        """
        stage = self._stage(IpcStage)
        return stage.stage(self._full_tensors(), bucket_bytes=bucket_bytes, dtype=dtype, **self._writer())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def release_weights_ipc(self) -> None:
        self._release_stage(IpcStage)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage_weights_tensors(self, bucket_bytes: int, dtype: str, payloads: int) -> dict:
        """Copy the full policy into rank 0's reusable buckets; its answer holds SGLang payloads of them.

        The buckets are CUDA buffers on a GPU, shared memory on the CPU (``transports.sglang_tensor``).
        """
        from atropos_verl.policy.fsdp_engine import _device

        return self._stage(TensorStage).stage(
            self._full_tensors(),
            bucket_bytes=bucket_bytes,
            dtype=dtype,
            device=_device().type,
            payloads=payloads,
            **self._writer(),
        )

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def weights_tensor_payloads(self, count: int) -> list[str]:
        """``count`` more payloads of what the buckets hold (rank 0; a payload serves one load by one TP rank)."""
        if self.rank != 0:
            return []
        return self._stage(TensorStage).payloads(count)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def release_weights_tensors(self) -> None:
        self._release_stage(TensorStage)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage_weights_shm(self, path: str, dtype: str) -> dict:
        """Copy the full policy into the shared-memory file at ``path``; rank 0 writes and answers its layout."""
        return self._stage(SharedMemoryStage).stage(self._full_tensors(), path=path, dtype=dtype, **self._writer())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def release_weights_shm(self) -> None:
        self._release_stage(SharedMemoryStage)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def nccl_manifest(self, dtype: str) -> dict:
        """Names, engine dtypes, shapes and byte sizes of the tensors an NCCL sync broadcasts, in order."""
        per_tensor = self._full_tensors()
        self._nccl_manifest = build_manifest(
            ((name, tensor.dtype, tensor.shape) for name, tensor in per_tensor),
            dtype,
            ties_word_embeddings(self.model_config.hf_config),
        )
        return dict(vars(self._nccl_manifest))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_weights_nccl(self, master_address: str, master_port: int, world_size: int) -> None:
        """Rank 0 joins the weight-transfer group as its rank 0 (vLLM 0.24's trainer side; needs vLLM and CUDA)."""
        if self.rank != 0:
            return
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        group = NCCLWeightTransferEngine.trainer_init(
            {"master_address": master_address, "master_port": master_port, "world_size": world_size}
        )
        self._nccl_sender = NcclSender(group, torch.cuda.current_device(), torch.cuda.synchronize)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_weights_sglang_group(
        self, master_address: str, master_port: int, world_size: int, backend: str, group_name: str, timeout_s: float
    ) -> None:
        """Rank 0 joins SGLang's weight-update group as its rank 0 (nccl on CUDA, gloo on CPU)."""
        if self.rank != 0:
            return
        group = UpdateGroup.join(
            master_address, master_port, world_size, backend=backend, group_name=group_name, timeout_s=timeout_s
        )
        self._nccl_group = group
        if torch.cuda.is_available() and backend == "nccl":
            self._nccl_sender = NcclSender(group, torch.cuda.current_device(), torch.cuda.synchronize)
        else:
            self._nccl_sender = NcclSender(group, "cpu")

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def send_weights_nccl(self, dtype: str, buffer_bytes: int) -> dict:
        """Broadcast the full policy to the group; rank 0 sends, the others only take part in the all-gathers."""
        per_tensor = self._full_tensors()
        if self.rank != 0:
            for _ in per_tensor:
                pass
            return {}
        sender, manifest = getattr(self, "_nccl_sender", None), getattr(self, "_nccl_manifest", None)
        if sender is None or manifest is None:
            raise RuntimeError("send_weights_nccl needs nccl_manifest and init_weights_nccl first")
        return sender.send(per_tensor, manifest, buffer_bytes)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def release_weights_nccl(self) -> None:
        self._nccl_sender = None
        group, self._nccl_group = getattr(self, "_nccl_group", None), None
        if group is not None:
            group.destroy()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def gpu_uuid(self) -> str | None:
        """This rank's physical GPU (None on CPU): a colocated replica's workers report the same UUID."""
        return gpu_uuid() if torch.cuda.is_available() else None
