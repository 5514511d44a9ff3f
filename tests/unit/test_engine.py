"""atropos_verl.engine: its padded-rows layout matches verl's padded path; read_back keeps verl's metric semantics."""

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.workers.utils.padding import build_attention_mask_from_nested

from atropos_verl.engine import PaddedRows, packed_labels, padded_model_inputs, read_back, uses_padded_rows_step


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
