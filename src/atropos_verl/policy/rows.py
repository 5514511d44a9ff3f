"""Batch TensorDicts of jagged rows: split into row ranges or selections, and moved between processes.

Both happen on the critical path of every actor update, while the GPU waits
for its first kernel (bench/RESULTS.md):

* verl splits batches (between data-parallel ranks, into mini- and
  micro-batches) with ``chunk_tensordict`` / ``index_select_tensor_dict``, which
  unbind every jagged tensor into one tensor per row and nest the rows again.
  A consecutive row range of a jagged tensor is one slice of its values and
  offsets; any other selection of rows is one gather.
* Ray pickles a TensorDict's tensors through torch's serialiser, tensor by
  tensor; numpy arrays it moves as out-of-band buffers. For 32 x 1,024 tokens
  a Ray call's hand-over took 23-26 ms as a TensorDict and 9-10 ms as numpy
  arrays (2-core CPU, measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict
from verl.utils import tensordict_utils as tu


def cuts_by_offsets(batch: TensorDict) -> bool:
    """True when every jagged tensor of ``batch`` is (rows, ragged) with no holes, the layout :func:`row_range` cuts."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.is_nested:
            if value.dim() != 2 or value._ragged_idx != 1 or value._lengths is not None:
                return False
    return True


def row_range(batch: TensorDict, start: int, stop: int, copy: bool = False) -> TensorDict:
    """Rows ``start:stop`` of ``batch`` (see :func:`cuts_by_offsets`); per-batch metadata is kept as it is.

    Without ``copy`` the tensors are views of ``batch``'s storage. Pickling a view
    sends its whole storage, so pass ``copy=True`` for a part that travels to another process.
    """

    def jagged(value: torch.Tensor) -> torch.Tensor:
        offsets = value.offsets()
        first, last = int(offsets[start]), int(offsets[stop])
        values = value.values()[first:last]
        return torch.nested.nested_tensor_from_jagged(
            values.clone() if copy else values, offsets[start : stop + 1] - first
        )

    def per_row(value):
        part = value[start:stop]
        return part.clone() if copy and isinstance(part, torch.Tensor) else part

    return _take_rows(batch, stop - start, jagged, per_row)


def split_rows(batch: TensorDict, parts: int, copy: bool = False) -> list[TensorDict]:
    """``batch`` as ``parts`` consecutive row ranges of equal size, in order."""
    rows = batch.batch_size[0]
    if rows % parts:
        raise ValueError(f"cannot split {rows} rows into {parts} equal parts")
    if parts == 1:
        return [batch]
    size = rows // parts
    return [row_range(batch, i * size, (i + 1) * size, copy=copy) for i in range(parts)]


@dataclass
class BatchArrays:
    """A batch TensorDict as numpy arrays and plain Python values, the form in which it crosses Ray."""

    rows: int
    jagged: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: dict[str, np.ndarray]
    per_row: dict[str, list]
    metadata: dict[str, Any]

    @classmethod
    def from_tensordict(cls, batch: TensorDict) -> BatchArrays | None:
        """None when ``batch`` holds something without a numpy form (a bfloat16 tensor, a jagged layout
        :func:`cuts_by_offsets` refuses); send such a batch as it is."""
        if not cuts_by_offsets(batch):
            return None
        jagged, dense, per_row, metadata = {}, {}, {}, {}
        try:
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and value.is_nested:
                    jagged[key] = (value.values().numpy(), value.offsets().numpy())
                elif isinstance(value, torch.Tensor):
                    dense[key] = value.numpy()
                elif isinstance(value, NonTensorStack):
                    per_row[key] = value.tolist()
                elif isinstance(value, NonTensorData):
                    metadata[key] = value.data
                else:
                    return None
        except TypeError:
            # numpy has no bfloat16.
            return None
        return cls(batch.batch_size[0], jagged, dense, per_row, metadata)

    def to_tensordict(self) -> TensorDict:
        # Copies: arrays received through Ray's object store are read-only.
        tensors: dict[str, Any] = {
            key: torch.nested.nested_tensor_from_jagged(
                torch.from_numpy(values.copy()), torch.from_numpy(offsets.copy())
            )
            for key, (values, offsets) in self.jagged.items()
        }
        tensors.update({key: torch.from_numpy(array.copy()) for key, array in self.dense.items()})
        tensors.update(self.per_row)
        return tu.get_tensordict(tensor_dict=tensors, non_tensor_dict=self.metadata)


def select_rows(batch: TensorDict, rows: list[int]) -> TensorDict:
    """Rows ``rows`` of ``batch`` in that order (see :func:`cuts_by_offsets`); a consecutive run is a row range."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return row_range(batch, rows[0], rows[0] + len(rows))
    index = torch.tensor(rows, dtype=torch.long)

    def jagged(value: torch.Tensor) -> torch.Tensor:
        offsets = value.offsets()
        starts = offsets[index]
        lengths = offsets[index + 1] - starts
        new_offsets = torch.zeros(len(rows) + 1, dtype=offsets.dtype)
        torch.cumsum(lengths, 0, out=new_offsets[1:])
        # Each selected token's position in the source values: its row's start plus its place in the row.
        tokens = torch.arange(int(new_offsets[-1])) + torch.repeat_interleave(starts - new_offsets[:-1], lengths)
        return torch.nested.nested_tensor_from_jagged(value.values()[tokens], new_offsets)

    return _take_rows(batch, len(rows), jagged, lambda value: value[index])


def _take_rows(batch: TensorDict, size: int, jagged, per_row) -> TensorDict:
    """A ``size``-row TensorDict of ``jagged(value)`` for each jagged tensor and ``per_row(value)`` for every
    other entry: dense tensors, per-row stacks, and per-batch data (whose indexing keeps its value)."""
    part = {
        key: jagged(value) if isinstance(value, torch.Tensor) and value.is_nested else per_row(value)
        for key, value in batch.items()
    }
    return TensorDict(part, batch_size=[size])
