"""Paged attention over the KV manager's block tensors.

A forward plans attention once (``AttentionPlan.build``) and every layer reuses the plan: sequences are
sorted by query length and packed into padded groups whose padding waste stays bounded, so a decode
batch of 64 sequences is one batched call per layer, while a long prefill runs alone. This step's K/V
are written through the flat view ``[num_blocks * 2 * tpb, kv_heads, head_dim]`` of a layer's cache
(row of K at slot (b, o) = b*2*tpb + o, V = that + tpb); reads gather whole blocks of K (or V) from the
view ``[num_blocks, 2, tpb*kv_heads*head_dim][:, 0]``, which lands directly as ``[G, L, kv_heads, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kvsched.engine.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from kvsched.engine.step_profile import StepProfile

# A group's padded work (seqs * max_q * max_kv) may exceed its real work by this factor plus a constant.
# SDPA's and the gather's cost grow with the padded work, a group costs ~4 ops: at 32 decodes of
# 100-270 tokens, 1.5/4096 made one group with 2x padding, 1.2/1024 makes 2-4 groups with <= 1.1x and a
# decode step 15 % cheaper (CPU time per step, SmolLM2, one thread, 133-140 ms vs 157-175 ms).
_PAD_FACTOR = 1.2
_PAD_SLACK = 1024


@dataclass(slots=True)
class _Group:
    q_rows: torch.Tensor | None  # [G*Qg] rows of the flat batch (padding -> 0); None = contiguous slice
    q_slice: tuple[int, int]  # used when q_rows is None (one sequence)
    num_seqs: int
    max_q: int
    blocks: torch.Tensor | None  # [G*W] cache blocks to gather, row-major per sequence
    mask: torch.Tensor | None  # [G, 1, Qg, L] bool (True = attend); None = plain causal
    out_src: torch.Tensor | None  # rows of the padded output that are real
    out_dst: torch.Tensor | None  # their rows in the flat batch
    #: Gather targets [G*W, tpb*Hkv*D] for K and V, allocated by the first layer and reused by the others:
    #: a fresh multi-MiB tensor per layer costs page faults (large allocations are fresh mmaps), and
    #: ``index_select(out=)`` into kept memory runs about 2.4x faster than allocating (measured, CPU).
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None
    #: Set when the group's query rows are one contiguous range [a, b) of the flat batch in order (a
    #: decode group usually is): q is sliced and the output written back by slice, no index ops.
    q_range: tuple[int, int] | None = None


@dataclass(slots=True)
class AttentionPlan:
    """Per-forward attention layout shared by all layers."""

    write_k_rows: torch.Tensor  # [T] flat cache rows where this step's K goes (V = +tpb)
    tokens_per_block: int
    groups: list[_Group]
    #: When set (``EngineArgs.profile_steps``), the K/V gathers of every layer are timed into it.
    profile: StepProfile | None = None

    @classmethod
    def build(cls, batch: ForwardBatch, sliding_window: int | None = None) -> AttentionPlan:
        tpb = batch.tokens_per_block
        dev = batch.input_ids.device
        slots = batch.slot_mapping
        write_rows = (slots // tpb) * (2 * tpb) + slots % tpb
        q_lens = batch.query_lens_host
        kv_lens = batch.seq_lens_host
        tables = batch.block_tables_host.astype(np.int64)
        order = sorted(range(len(q_lens)), key=lambda i: (q_lens[i], kv_lens[i]))
        starts = np.zeros(len(q_lens) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=starts[1:])
        groups: list[_Group] = []
        i = 0
        while i < len(order):
            j, real = i + 1, q_lens[order[i]] * kv_lens[order[i]]
            max_kv = kv_lens[order[i]]
            while j < len(order):
                s = order[j]
                cand_kv = max(max_kv, kv_lens[s])
                cand_real = real + q_lens[s] * kv_lens[s]
                if (j - i + 1) * q_lens[s] * cand_kv > _PAD_FACTOR * cand_real + _PAD_SLACK:
                    break
                real, max_kv, j = cand_real, cand_kv, j + 1
            members = order[i:j]
            i = j
            if len(members) == 1 and kv_lens[members[0]] == q_lens[members[0]] and sliding_window is None:
                s = members[0]
                groups.append(
                    _Group(None, (int(starts[s]), int(starts[s + 1])), 1, q_lens[s], None, None, None, None)
                )
                continue
            groups.append(_plan_group(members, q_lens, kv_lens, starts, tables, tpb, sliding_window, dev))
        return cls(write_k_rows=write_rows, tokens_per_block=tpb, groups=groups)


def _plan_group(
    members: list[int],
    q_lens: list[int],
    kv_lens: list[int],
    starts: np.ndarray,
    tables: np.ndarray,
    tpb: int,
    window: int | None,
    device: torch.device,
) -> _Group:
    members = sorted(members)  # batch order (any order within a group is equally valid)
    g = len(members)
    max_q = max(q_lens[s] for s in members)
    width = -(-max(kv_lens[s] for s in members) // tpb)
    length = width * tpb
    idx = np.asarray(members, dtype=np.int64)
    qn = np.asarray([q_lens[s] for s in members], dtype=np.int64)
    kvn = np.asarray([kv_lens[s] for s in members], dtype=np.int64)
    offs = np.arange(max_q, dtype=np.int64)
    valid = offs[None, :] < qn[:, None]  # [G, Qg]
    q_rows = np.where(valid, starts[idx][:, None] + offs[None, :], 0)
    q_pos = np.where(valid, (kvn - qn)[:, None] + offs[None, :], 0)
    blocks = tables[idx, :width]  # [G, W]
    key_pos = np.arange(length, dtype=np.int64)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [G, Qg, L]
    if window is not None:
        mask &= key_pos[None, None, :] > q_pos[:, :, None] - window
    flat_valid = valid.reshape(-1)
    out_src = np.nonzero(flat_valid)[0]
    out_dst = q_rows.reshape(-1)[flat_valid]

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    q_range = None
    first = int(starts[members[0]])
    if max_q == 1 and bool((starts[idx] == first + np.arange(g)).all()):
        q_range = (first, first + g)
    return _Group(
        q_rows=to(q_rows.reshape(-1)),
        q_slice=(0, 0),
        num_seqs=g,
        max_q=max_q,
        blocks=to(blocks.reshape(-1)),
        mask=to(mask[:, None]),
        out_src=to(out_src),
        out_dst=to(out_dst),
        q_range=q_range,
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    plan: AttentionPlan,
) -> torch.Tensor:
    """Write this step's K/V into ``cache`` and attend. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq*D]."""
    prof = plan.profile
    if prof is None:
        return _paged_attention(q, k, v, cache, plan)
    t0 = perf_counter()
    out = _paged_attention(q, k, v, cache, plan)
    prof.add("attention", perf_counter() - t0)
    return out


def _paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    plan: AttentionPlan,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    tpb = plan.tokens_per_block
    flat = cache.view(-1, kv_heads, head_dim)
    flat.index_copy_(0, plan.write_k_rows, k.to(flat.dtype))
    flat.index_copy_(0, plan.write_k_rows + tpb, v.to(flat.dtype))
    groups = plan.groups
    if len(groups) == 1 and groups[0].q_rows is None:
        return _causal_self(q, k, v).reshape(num_tokens, num_heads * head_dim)
    whole = len(groups) == 1 and groups[0].q_range == (0, num_tokens)  # SDPA's output is the output
    out = None if whole else q.new_empty(num_tokens, num_heads * head_dim)
    per_block = cache.view(cache.shape[0], 2, -1)  # gathering whole blocks of K (or V) yields [G, L, Hkv, D]
    k_blocks, v_blocks = per_block[:, 0], per_block[:, 1]
    prof = plan.profile
    for grp in groups:
        if grp.q_rows is None:
            a, b = grp.q_slice
            out[a:b] = _causal_self(q[a:b], k[a:b], v[a:b]).reshape(b - a, num_heads * head_dim)
            continue
        g, qn = grp.num_seqs, grp.max_q
        t0 = perf_counter() if prof is not None else 0.0
        rng = grp.q_range
        if rng is None:
            qg = q.index_select(0, grp.q_rows).view(g, qn, num_heads, head_dim)
        else:
            qg = q[rng[0] : rng[1]].view(g, qn, num_heads, head_dim)
        if grp.k_buf is None:
            shape = (grp.blocks.shape[0], k_blocks.shape[1])
            grp.k_buf = k_blocks.new_empty(shape)
            grp.v_buf = k_blocks.new_empty(shape)
        assert grp.v_buf is not None
        kg = torch.index_select(k_blocks, 0, grp.blocks, out=grp.k_buf).view(g, -1, kv_heads, head_dim)
        vg = torch.index_select(v_blocks, 0, grp.blocks, out=grp.v_buf).view(g, -1, kv_heads, head_dim)
        if kg.dtype != q.dtype:
            kg, vg = kg.to(q.dtype), vg.to(q.dtype)
        if prof is not None:
            prof.add("attention_gather", perf_counter() - t0)
        # One SDPA call per group, decode included: CPU SDPA is one parallel region over (sequence,
        # head) where a bmm pair per KV head was nine ops with a thread barrier each; measured 1.2-1.6x
        # faster single-threaded and ~4x with two threads on a busy machine (64 sequences x 160 tokens).
        og = F.scaled_dot_product_attention(
            qg.transpose(1, 2),
            kg.transpose(1, 2),
            vg.transpose(1, 2),
            attn_mask=grp.mask,
            enable_gqa=kv_heads != num_heads,
        ).transpose(1, 2)
        og = og.reshape(g * qn, num_heads * head_dim)
        if out is None:  # the whole batch in one range (a pure decode step)
            return og
        if rng is not None:
            out[rng[0] : rng[1]] = og
        elif g * qn == grp.out_src.shape[0]:
            out.index_copy_(0, grp.out_dst, og)
        else:
            out.index_copy_(0, grp.out_dst, og.index_select(0, grp.out_src))
    return out


def _causal_self(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A sequence whose whole KV is this step's tokens: plain causal attention, no cache read."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)
