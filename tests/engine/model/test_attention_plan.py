"""AttentionPlan: decode groups read q and write the output by slice when their rows are contiguous,
with the same result as the index path, and a decode batch of very different lengths is split into
groups whose padding stays within the bound."""

from __future__ import annotations

import dataclasses

import torch

from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.model import attention as att

TPB, HQ, HKV, D = 4, 4, 2, 8


def _decode(lengths: list[int], first_block: int = 0) -> ForwardBatch:
    seqs, block = [], first_block
    for n in lengths:
        width = -(-n // TPB)
        seqs.append(SeqInput([1], n - 1, list(range(block, block + width)), 1))
        block += width
    return ForwardBatch.build(seqs, TPB)


def _qkv(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(600, 2, TPB, HKV, D, generator=g)
    return (
        torch.randn(t, HQ, D, generator=g),
        torch.randn(t, HKV, D, generator=g),
        torch.randn(t, HKV, D, generator=g),
        cache,
    )


def test_contiguous_decode_group_slices_and_matches_index_path():
    batch = _decode([9, 12, 10, 11])
    plan = att.AttentionPlan.build(batch)
    assert len(plan.groups) == 1 and plan.groups[0].q_range == (0, 4)
    q, k, v, cache = _qkv(4, 1)
    fast = att.paged_attention(q, k, v, cache.clone(), plan)
    slow_plan = att.AttentionPlan.build(batch)
    slow_plan.groups = [dataclasses.replace(g, q_range=None) for g in slow_plan.groups]
    slow = att.paged_attention(q, k, v, cache.clone(), slow_plan)
    assert torch.equal(fast, slow)


def test_mixed_batch_decodes_after_a_prefill_use_their_range():
    prefill = SeqInput([1] * 300, 0, list(range(100, 175)), 1)  # long: a group of its own
    batch = ForwardBatch.build(
        [prefill, *[SeqInput([1], n - 1, [200 + 2 * i, 201 + 2 * i], 1) for i, n in enumerate((5, 6))]], TPB
    )
    plan = att.AttentionPlan.build(batch)
    ranges = [g.q_range for g in plan.groups if g.q_rows is not None]
    assert ranges == [(300, 302)]  # the two decodes sit after the prefill's rows
    q, k, v, cache = _qkv(302, 2)
    fast = att.paged_attention(q, k, v, cache.clone(), plan)
    slow_plan = att.AttentionPlan.build(batch)
    slow_plan.groups = [dataclasses.replace(g, q_range=None) for g in slow_plan.groups]
    assert torch.equal(fast, att.paged_attention(q, k, v, cache.clone(), slow_plan))


def test_decode_lengths_far_apart_are_split_with_bounded_padding():
    """Two clusters of uneven lengths: one group each, and each group's padded work (its members
    padded to its longest, read from the group's own mask) within the bound."""
    short, long = [8, 13, 21, 30, 40, 9, 17, 25, 33, 12], [500, 533, 560, 600, 517, 588]
    plan = att.AttentionPlan.build(_decode(short + long))
    assert len(plan.groups) == 2
    clusters = []
    for g in plan.groups:
        kv = g.mask[:, 0, 0, :].sum(-1).tolist()  # a decode row attends to its whole length
        length = g.mask.shape[-1]
        assert len(kv) == g.num_seqs and length >= max(kv)
        assert g.num_seqs * length <= att._PAD_FACTOR * sum(kv) + att._PAD_SLACK
        clusters.append(sorted(kv))
    assert sorted(clusters) == [sorted(short), sorted(long)]


def test_interleaved_decode_group_uses_the_index_path():
    lengths = [8, 600, 8, 600, 8, 600]  # each group's rows alternate in the flat batch
    plan = att.AttentionPlan.build(_decode(lengths))
    assert len(plan.groups) == 2
    assert all(g.q_range is None for g in plan.groups)
