"""Row ranges and the Ray transfer form of batch TensorDicts (atropos_verl.policy.rows) against verl's own splitting."""

import pickle
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from atropos_verl.policy.rows import BatchArrays, cuts_by_offsets, row_range, select_rows, split_rows


def jagged(rows, dtype=torch.float32):
    return torch.nested.as_nested_tensor(
        [torch.arange(n, dtype=dtype) + 10 * i for i, n in enumerate(rows)], layout=torch.jagged
    )


def make_batch(lengths=(3, 5, 1, 4, 2, 6)):
    return tu.get_tensordict(
        tensor_dict={
            "input_ids": jagged(lengths, torch.long),
            "loss_mask": jagged(lengths),
            "temperature": torch.linspace(0.5, 1.5, len(lengths)),
            "uid": [f"seq{i}" for i in range(len(lengths))],
        },
        non_tensor_dict={"num_mini_batch": 2, "global_token_num": list(lengths)},
    )


def assert_same_batch(got, want):
    assert set(got.keys()) == set(want.keys())
    assert got.batch_size == want.batch_size
    for key in want.keys():
        g, w = got.get(key), want.get(key)
        if isinstance(w, torch.Tensor) and w.is_nested:
            assert g.is_nested
            assert torch.equal(g.values(), w.values()) and torch.equal(g.offsets(), w.offsets()), key
        elif isinstance(w, torch.Tensor):
            assert torch.equal(g, w), key
        else:
            assert g.tolist() == w.tolist(), key


@pytest.mark.parametrize("parts", [1, 2, 3, 6])
def test_split_rows_gives_verls_chunks(parts):
    batch = make_batch()
    for got, want in zip(split_rows(batch, parts), tu.chunk_tensordict(batch, parts), strict=True):
        assert_same_batch(got, want)
        assert tu.get_non_tensor_data(got, "num_mini_batch", None) == 2


def test_row_range_views_unless_copied():
    batch = make_batch()
    view, copy = row_range(batch, 1, 3), row_range(batch, 1, 3, copy=True)
    assert (
        view["input_ids"].values().untyped_storage().data_ptr()
        == batch["input_ids"].values().untyped_storage().data_ptr()
    )
    assert (
        copy["input_ids"].values().untyped_storage().data_ptr()
        != batch["input_ids"].values().untyped_storage().data_ptr()
    )
    # A copied part pickles only its own rows.
    assert len(pickle.dumps(copy["loss_mask"].values())) < len(pickle.dumps(view["loss_mask"].values()))
    assert view["input_ids"].values().tolist() == [10, 11, 12, 13, 14, 20]
    assert view["input_ids"].offsets().tolist() == [0, 5, 6]


def test_split_rows_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="6 rows into 4"):
        split_rows(make_batch(), 4)


def test_layouts_without_offsets_cuts_are_refused():
    batch = make_batch()
    assert cuts_by_offsets(batch)
    with_holes = torch.nested.narrow(
        torch.arange(12.0).view(3, 4), 1, torch.tensor([0, 1, 0]), torch.tensor([2, 3, 1]), layout=torch.jagged
    )
    batch_with_holes = TensorDict({"x": with_holes}, batch_size=[3])
    assert not cuts_by_offsets(batch_with_holes)
    assert BatchArrays.from_tensordict(batch_with_holes) is None


def test_batch_arrays_round_trip_through_pickle():
    batch = make_batch()
    arrays = BatchArrays.from_tensordict(batch)
    assert arrays is not None
    restored = pickle.loads(pickle.dumps(arrays)).to_tensordict()
    assert_same_batch(restored, batch)
    assert tu.get_non_tensor_data(restored, "global_token_num", None) == [3, 5, 1, 4, 2, 6]
    restored["loss_mask"].values().add_(1)  # writable, and not the sender's memory
    assert batch["loss_mask"].values()[0] == 0


def test_bfloat16_batches_travel_as_tensordicts():
    batch = make_batch()
    batch["loss_mask"] = jagged((3, 5, 1, 4, 2, 6), torch.bfloat16)
    assert BatchArrays.from_tensordict(batch) is None


def test_the_driver_sends_one_worker_the_whole_batch_as_arrays():
    from atropos_verl.policy.worker import _dispatch_rows_by_data_parallel_rank

    workers = SimpleNamespace(_dispatch_info={"train": [0]}, world_size=1)
    batch = make_batch()
    (shares,), kwargs = _dispatch_rows_by_data_parallel_rank(workers, batch)
    assert kwargs == {} and len(shares) == 1
    assert isinstance(shares[0], BatchArrays)
    assert_same_batch(shares[0].to_tensordict(), batch)


@pytest.mark.parametrize("rows", [[4, 0, 2], [5], [1, 2, 3], [3, 1]])
def test_select_rows_gives_verls_index_select(rows):
    batch = make_batch()
    assert_same_batch(
        select_rows(batch, rows), tu.index_select_tensor_dict(batch, torch.tensor(rows, dtype=torch.long))
    )
