"""ForwardBatch flattening: slots, offsets, logits rows and input checks."""

from __future__ import annotations

import pytest
import torch

from kvsched.core.errors import InvalidRequestError
from kvsched.engine.forward_batch import ForwardBatch, SeqInput


def test_flattening():
    b = ForwardBatch.build(
        [SeqInput([5, 6, 7], 2, [9, 4], 1), ([8], 6, [3, 1, 7, 2], 1), SeqInput([1, 2], 0, [6], 0)], 4
    )
    assert b.input_ids.tolist() == [5, 6, 7, 8, 1, 2]
    assert b.positions.tolist() == [2, 3, 4, 6, 0, 1]
    assert b.slot_mapping.tolist() == [9 * 4 + 2, 9 * 4 + 3, 4 * 4 + 0, 1 * 4 + 2, 6 * 4, 6 * 4 + 1]
    assert b.query_start.tolist() == [0, 3, 4, 6]
    assert b.seq_lens.tolist() == [5, 7, 2]
    assert b.block_tables.dtype == torch.int32
    assert b.block_tables.tolist() == [[9, 4], [3, 1], [6, 0]]  # trimmed to blocks in use, 0-padded
    assert b.logits_indices.tolist() == [2, 3]


def test_draft_logits_rows():
    b = ForwardBatch.build([SeqInput([1, 2, 3, 4], 10, [0, 1, 2, 3], 3), SeqInput([7], 0, [5], 1)], 4)
    assert b.logits_indices.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "seq",
    [
        SeqInput([], 0, [1], 0),
        SeqInput([1], -1, [1], 1),
        SeqInput([1, 2], 0, [1], 3),
        SeqInput([1, 2, 3], 3, [1], 1),  # needs 2 blocks, table has 1
    ],
)
def test_bad_input(seq):
    with pytest.raises(InvalidRequestError):
        ForwardBatch.build([seq], 4)


def test_empty_batch():
    with pytest.raises(InvalidRequestError):
        ForwardBatch.build([], 4)
