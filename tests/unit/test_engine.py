"""policy.fsdp_engine: its padded-rows layout matches verl's padded path; read_back keeps verl's metric semantics."""

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.workers.utils.padding import build_attention_mask_from_nested

from atropos_verl.policy.fsdp_engine import (
    PaddedRows,
    packed_labels,
    padded_model_inputs,
    read_back,
    uses_padded_rows_step,
)


def jagged(tensors):
    return torch.nested.as_nested_tensor(tensors, layout=torch.jagged)


def micro_batch(lengths, **options):
    ids = [torch.randint(1, 100, (n,)) for n in lengths]
    return tu.get_tensordict(
        tensor_dict={"input_ids": jagged(ids), "position_ids": jagged([torch.arange(n) for n in lengths])},
        non_tensor_dict={"use_remove_padding": False, "temperature": 1.0, **options},
    )


@pytest.mark.parametrize("lengths", [[5, 3, 7], [4, 4]])
def test_inputs_and_packed_log_probs_match_verls_padded_path(lengths):
    batch = micro_batch(lengths)
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    rows = PaddedRows(input_ids.offsets())
    inputs = padded_model_inputs(batch, rows)
    width = max(lengths)

    want_ids = torch.nested.to_padded_tensor(input_ids, padding=0, output_size=(len(lengths), width))
    assert torch.equal(inputs["input_ids"], want_ids)
    if len(set(lengths)) > 1:
        want_positions = torch.nested.to_padded_tensor(position_ids, padding=0, output_size=(len(lengths), width))
        assert torch.equal(inputs["position_ids"], want_positions)
        assert torch.equal(inputs["attention_mask"], build_attention_mask_from_nested(input_ids, width))
    else:
        # Full rows counting from 0: exactly what the model assumes without mask and positions.
        assert set(inputs) == {"input_ids"}

    # verl: narrow the padded logits per row, concatenate, take log-probs of the rolled packed labels.
    logits = torch.randn(len(lengths), width, 11)
    labels = packed_labels(input_ids) % 11
    starts = torch.zeros(len(lengths), dtype=torch.int64)
    narrowed = torch.nested.narrow(logits, 1, starts, input_ids.offsets().diff(), layout=torch.jagged)
    want = torch.cat(list(narrowed.unbind())).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    padded_labels = rows.pad(labels)
    got = logits.log_softmax(-1).gather(-1, padded_labels.unsqueeze(-1)).squeeze(-1).flatten()[rows.slots]
    assert torch.equal(got, want)


def test_other_layouts_and_outputs_use_verls_step():
    assert uses_padded_rows_step(micro_batch([3, 2]))
    assert not uses_padded_rows_step(micro_batch([3, 2], use_remove_padding=True))
    assert not uses_padded_rows_step(micro_batch([3, 2], calculate_entropy=True))


def test_read_back_turns_tensor_metrics_into_summed_metrics_and_keeps_others():
    output = {
        "loss": [torch.tensor(0.5), torch.tensor(0.25)],
        "metrics": {"share": [torch.tensor(1.0), torch.tensor(2.0)], "verl": [3.0, 4.0]},
    }
    read_back(output)
    assert output["loss"] == [0.5, 0.25]
    assert isinstance(output["metrics"]["share"], Metric)
    assert output["metrics"]["share"].aggregate() == 3.0
    assert output["metrics"]["verl"] == [3.0, 4.0]


def test_read_back_takes_the_maximum_of_max_metrics():
    output = {
        "loss": [torch.tensor(0.5), torch.tensor(0.25)],
        "metrics": {"ratio_max": [torch.tensor(1.5), torch.tensor(1.2)]},
    }
    read_back(output)
    assert output["metrics"]["ratio_max"].aggregate() == 1.5


def _clip_on_ranks(rank: int, world_size: int, port: int, results) -> None:
    """Each rank: the same FSDP2-sharded model, its own inputs; clip with ours and with torch's on full gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from atropos_verl.policy.fsdp_engine import clip_sharded_grad_norm_

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        # An odd first dimension leaves the shards uneven (one rank holds more rows).
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        torch.manual_seed(100 + rank)
        (model(torch.randn(4, 6)) ** 2).sum().backward()

        full = [p.grad.full_tensor().clone() for p in model.parameters()]
        want_norm = torch.nn.utils.get_total_norm(full)
        for g in full:
            g.mul_(min(1.0, 0.5 / (float(want_norm) + 1e-6)))
        got_norm = clip_sharded_grad_norm_(model.parameters(), max_norm=0.5)
        clipped = [p.grad.full_tensor() for p in model.parameters()]
        results[rank] = (
            float(want_norm),
            float(got_norm),
            max(float((a - b).abs().max()) for a, b in zip(full, clipped)),
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2])
def test_clip_on_local_shards_matches_torch_clip_on_full_gradients(world_size):
    import torch.multiprocessing as mp

    from atropos_verl.netutil import free_port

    results = mp.Manager().dict()
    mp.start_processes(_clip_on_ranks, args=(world_size, free_port(), results), nprocs=world_size, start_method="spawn")
    for rank in range(world_size):
        want_norm, got_norm, max_diff, clipped_norm = results[rank]
        assert want_norm > 0.5, "the test gradients must be large enough to be clipped"
        assert got_norm == pytest.approx(want_norm, rel=1e-6)
        assert max_diff < 1e-6
        assert clipped_norm == pytest.approx(0.5, rel=1e-4)


def test_clip_leaves_unsharded_gradients_to_verl():
    from atropos_verl.policy.fsdp_engine import clip_sharded_grad_norm_

    model = torch.nn.Linear(3, 2)
    model(torch.randn(2, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert clip_sharded_grad_norm_(model.parameters(), max_norm=1e-3) is None
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
