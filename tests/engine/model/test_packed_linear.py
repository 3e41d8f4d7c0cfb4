"""Prepacked (oneDNN) linears: same results as the modules within fp32 rounding, fused q|k|v and
gate|up, a plain fallback for wrapped modules, and re-packing when a weight changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testlib import FakeKVStorage
from torch import nn

from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.model import packed as pk
from kvsched.engine.weights.loader import load_model

pytestmark = pytest.mark.skipif(not pk.prepacking_enabled(), reason="oneDNN prepacking unavailable")


@pytest.fixture
def prepacking_on():
    previous = pk.set_prepacking(True)
    yield
    pk.set_prepacking(previous)


def _lin(n_in: int, n_out: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)  # a weight that needs grad: no packing


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_separate_linears(prepacking_on, rows, bias):
    owner = nn.Module()
    mods = (_lin(64, 48, bias, 1), _lin(64, 16, bias, 2), _lin(64, 16, False, 3))
    x = torch.randn(rows, 64)
    ref = torch.cat([F.linear(x, m.weight, m.bias) for m in mods], dim=1)
    p = pk.packed(owner, "slot", mods)
    assert p is not None
    out = p(x)
    assert out.shape == (rows, 80)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert pk.packed(owner, "slot", mods) is p  # cached, not packed again


def test_changed_weight_is_repacked(prepacking_on):
    mod = _lin(32, 24, False, 4)
    x = torch.randn(5, 32)
    before = pk.linear(mod, "slot", mod, x, release=False)  # kept (a tied head): it can still be written
    with torch.no_grad():
        mod.weight.mul_(-2.0)  # in place: the version counter moves
    torch.testing.assert_close(
        pk.linear(mod, "slot", mod, x, release=False), -2.0 * before, atol=1e-5, rtol=1e-5
    )
    mod.weight = nn.Parameter(torch.zeros(24, 32), requires_grad=False)  # replaced outright
    assert torch.count_nonzero(pk.linear(mod, "slot", mod, x)) == 0


def test_released_weights_come_back_exactly(prepacking_on):
    mods = (_lin(64, 48, True, 7), _lin(64, 16, False, 8))
    saved = [m.weight.clone() for m in mods]
    owner = nn.Module()
    assert pk.packed(owner, "slot", mods) is not None
    for m, w in zip(mods, saved):
        assert m.weight.shape == w.shape and m.weight.untyped_storage().nbytes() == 4  # storage freed
        assert torch.isnan(m.weight).all()  # a stray read is loud
        with pytest.raises(RuntimeError):
            m.weight.add_(1.0)  # so is a write
    pk.set_prepacking(False)
    for m, w in zip(mods, saved):
        assert torch.equal(m.weight, w)  # at once, and to_dense undoes the reorder bit for bit
    assert pk.packed(owner, "slot", mods) is None
    assert "slot" not in owner.__dict__


class _Wrapped(nn.Module):
    """Stands in for a LoRA wrapper or a quantized linear: anything but a plain nn.Linear."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 1.0


def test_wrapped_module_falls_back_and_drops_stale_copy(prepacking_on):
    base = _lin(16, 8, False, 5)
    x = torch.randn(3, 16)
    ref = base(x)
    owner = nn.Module()
    assert pk.packed(owner, "slot", (base,)) is not None
    wrapped = _Wrapped(base)  # as install_lora after a forward: the wrapper's base had been packed
    assert pk.packed(owner, "slot", (wrapped,)) is None
    assert "slot" not in owner.__dict__  # the packed copy is dropped, the base has its weight back
    assert torch.equal(wrapped(x), ref + 1.0)


def test_weight_that_needs_grad_is_not_packed(prepacking_on):
    mod = _lin(8, 8, False, 6).requires_grad_(True)
    assert pk.packed(nn.Module(), "slot", (mod,)) is None  # autograd stays exact
    with torch.inference_mode():
        assert pk.packed(nn.Module(), "slot", (mod,)) is not None


def test_switched_off_uses_the_modules():
    previous = pk.set_prepacking(False)
    try:
        assert pk.packed(nn.Module(), "slot", (_lin(8, 8, False, 6),)) is None
    finally:
        pk.set_prepacking(previous)


def test_model_logits_and_greedy_tokens_agree_with_and_without_packing(tiny_llama):
    _, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    toks = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    batch = ForwardBatch.build([SeqInput(toks, 0, list(range(10)), len(toks))], 4)
    outs = []
    for on in (False, True):
        previous = pk.set_prepacking(on)
        try:
            kv = FakeKVStorage(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim)
            outs.append(model(batch, kv))
        finally:
            pk.set_prepacking(previous)
    plain, fast = outs
    assert "_kvsched_packed_qkv" in model.model.layers[0].self_attn.__dict__  # the fast path really ran
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


def test_quantizing_after_a_forward_reads_the_real_weights(tiny_llama, prepacking_on):
    """A forward releases the projections' weights into packed copies; quantize_model must quantize the
    real weights (restore_weights), not the NaN placeholders."""
    from kvsched.engine.quant import quantize_model

    _, folder = tiny_llama
    toks = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    batch = ForwardBatch.build([SeqInput(toks, 0, list(range(6)), len(toks))], 4)

    def logits(after_forward: bool) -> torch.Tensor:
        model, config, _ = load_model(str(folder))
        if after_forward:
            model(batch, FakeKVStorage(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim))
            assert "_kvsched_packed_qkv" in model.model.layers[0].self_attn.__dict__
        assert quantize_model(model, "int8") > 0
        assert not any("_kvsched_packed" in k for m in model.modules() for k in m.__dict__)
        kv = FakeKVStorage(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim)
        return model(batch, kv)

    late, early = logits(True), logits(False)
    assert torch.isfinite(late).all()
    assert torch.equal(late, early)


def test_restore_weights_gives_every_projection_back(tiny_llama, prepacking_on):
    _, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = ForwardBatch.build([SeqInput(list(range(1, 9)), 0, [0, 1], 8)], 4)
    model(batch, FakeKVStorage(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim))
    assert torch.isnan(model.model.layers[0].self_attn.q_proj.weight).all()  # released by the forward
    assert pk.restore_weights(model) >= 2 * config.num_layers  # q|k|v and gate|up at least, per layer
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert pk.restore_weights(model) == 0
