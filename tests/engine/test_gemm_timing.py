"""measure_gemm_profile times the engine's own forward: one sequence of M tokens without logits (body)
and with M logits (head = the difference), a warm-up pair and ``reps`` timed pairs per row count, into
a private KV pool (the engine's blocks are never written)."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import make_engine

from kvsched.core.errors import ConfigError
from kvsched.engine.gemm_timing import measure_gemm_profile


def test_profile_runs_the_forward_at_each_row_count_with_and_without_logits(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir, num_device_blocks=16)
    model = ex.parts.model
    engine_kv = [t.clone() for t in ex.parts.storage.device_kv]
    head_rows: list[int] = []
    body_rows: list[int] = []
    hooks = [
        # the final norm runs on the rows that get logits (the LM head's input); layer 0 on every row
        model.model.norm.register_forward_hook(lambda mod, args, out: head_rows.append(args[0].shape[0])),
        model.model.layers[0].register_forward_hook(
            lambda mod, args, out: body_rows.append(args[0].shape[0])
        ),
    ]
    try:
        cpu, wall = measure_gemm_profile(model, rows=(1, 3, 20), reps=2)
    finally:
        for h in hooks:
            h.remove()
    # per row count: 1 warm-up + 2 timed pairs of (no logits, all rows' logits)
    assert body_rows == [1] * 6 + [3] * 6 + [20] * 6
    assert [r for r in head_rows if r] == [1] * 3 + [3] * 3 + [20] * 3
    assert all(r == 0 for r in head_rows[::2]) and len(head_rows) == 18
    for p in (cpu, wall):
        assert p.rows == (1, 3, 20) and len(p.body) == len(p.head) == 3
        assert all(t >= 0 for t in (*p.body, *p.head)) and all(t > 0 for t in p.body)
    assert all(torch.equal(a, b) for a, b in zip(engine_kv, ex.parts.storage.device_kv))


def test_bad_arguments_are_config_errors(tiny_llama_dir):
    model = make_engine(tiny_llama_dir, num_device_blocks=16).parts.model
    with pytest.raises(ConfigError, match="reps"):
        measure_gemm_profile(model, rows=(1, 2), reps=0)
    with pytest.raises(ConfigError, match="rows"):
        measure_gemm_profile(model, rows=(), reps=1)
    with pytest.raises(ConfigError, match="increasing"):
        measure_gemm_profile(model, rows=(4, 2), reps=1)
