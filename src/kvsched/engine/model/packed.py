"""Linears on oneDNN-prepacked weights: the CPU fp32 matmuls of the decoder and the LM head.

``F.linear`` on CPU runs MKL's sgemm, which re-blocks the weight on every call; at decode batch sizes
(M = 1..64 rows against a [N, 576] weight) that costs as much as the multiply. oneDNN's linear with a
weight reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the path
PyTorch's inductor uses for frozen CPU linears) measured, single thread, on SmolLM2-135M's shapes:
the 30 layers' projections at M = 32 in 76 ms instead of 118 ms (90 vs 58 GF/s), the LM head
[49152, 576] in 21.7 ms instead of 33.2 ms, and a 1,500-token prefill 12 % faster. Results differ from
``F.linear`` in the last bits (|diff| ~ 5e-6 on unit-scale logits; another summation order), which the
HF greedy-equality tests cover.

The packed weight replaces the modules' own copy instead of doubling it (+540 MB for SmolLM2 with both,
which put peak RSS above HF's): a decoder projection's ``weight`` keeps its Parameter, name and shape
but its storage is released (a one-element NaN expanded to the shape: a stray read gives NaN, a write
fails loudly), and is restored exactly (``to_dense`` undoes the reorder bit for bit) before anything
else runs the modules: prepacking switched off, a module replaced (LoRA wrapper, int8/int4) or its
weight replaced. A tied LM head keeps its weight (the embedding reads it). Projections that share an
input are packed as one weight (q|k|v, gate|up): one call instead of three. A module that is not a
plain fp32 CPU ``nn.Linear`` is never packed; the caller falls back to calling the modules.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

#: Batch-size hint of the reorder; the blocked layout it picks served M = 1..1,500 (measured).
_BATCH_HINT = 32

#: oneDNN and its prepacked linear op are in this torch build (decided once: both checks read it).
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = _AVAILABLE


def set_prepacking(enabled: bool) -> bool:
    """Switch prepacked linears on or off for every model (on where oneDNN is available); returns the
    previous setting. Off, every projection is a plain ``nn.Linear`` call (``F.linear``)."""
    global _enabled
    previous = _enabled
    _enabled = bool(enabled) and _AVAILABLE
    if not _enabled:  # every module has its own weight again at once, not only at its next call
        for owner in list(_owners):
            restore_weights(owner)
    return previous


def prepacking_enabled() -> bool:
    return _enabled


def restore_weights(model: nn.Module) -> int:
    """Give every module under ``model`` its own weights back and drop their packed copies; returns how
    many packed weights were dropped. Code that reads a projection's weight values directly
    (quantization) calls it first: a released weight reads as NaN. A module merely swapped for a
    wrapper (LoRA) needs nothing: ``packed`` restores it at the owner's next call."""
    dropped = 0
    for mod in model.modules():
        slots = [k for k, v in mod.__dict__.items() if isinstance(v, PackedLinear)]
        for slot in slots:
            mod.__dict__.pop(slot).restore()
            dropped += 1
    return dropped


@dataclass(slots=True)
class PackedLinear:
    """One oneDNN weight packed from the rows of one or more ``nn.Linear`` (concatenated in order)."""

    weight: torch.Tensor  # mkldnn tensor [sum(out), in]
    bias: torch.Tensor | None
    #: (module, its weight, that weight's version) at packing: any change means re-pack.
    sources: tuple[tuple[nn.Module, torch.Tensor, int], ...]
    #: The modules' own weight storage was released (restore it before they run again).
    released: bool = False

    def matches(self, mods: tuple[nn.Module, ...]) -> bool:
        if len(mods) != len(self.sources):
            return False
        for mod, (src, weight, version) in zip(mods, self.sources):
            if mod is not src:  # replaced (LoRA wrapper, quantized linear): may have no weight at all
                return False
            w = _weight(mod)
            if w is not weight or _version(w) != version:
                return False
        return True

    def restore(self) -> None:
        """Give the source modules their weights back (exact), if they were released."""
        if not self.released:
            return
        with torch.inference_mode(False), torch.no_grad():
            dense = self.weight.to_dense()
            start = 0
            for _, w, _ in self.sources:
                rows = w.shape[0]
                w.data = dense[start : start + rows].clone()
                start += rows
        self.released = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out


def _packable(mods: tuple[nn.Module, ...]) -> bool:
    for mod in mods:
        if type(mod) is not nn.Linear:  # LoRA wrappers and quantized linears keep their own forward
            return False
        w = _weight(mod)
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.requires_grad and torch.is_grad_enabled():
            return False
    return True


def _pack(mods: tuple[nn.Module, ...], release: bool) -> PackedLinear:
    weights = [_weight(m) for m in mods]
    with torch.no_grad():
        w = weights[0].detach() if len(mods) == 1 else torch.cat([t.detach() for t in weights])
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _BATCH_HINT)
        biases: list[torch.Tensor | None] = [getattr(m, "bias", None) for m in mods]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [b.detach() if b is not None else t.new_zeros(t.shape[0]) for b, t in zip(biases, weights)]
            )
    if release:
        with torch.inference_mode(False), torch.no_grad():
            for t in weights:
                t.data = torch.full((1, 1), float("nan"), dtype=t.dtype).expand(t.shape)
    sources = tuple((m, t, _version(t)) for m, t in zip(mods, weights))
    return PackedLinear(packed, bias, sources, released=release)


#: Modules holding packed weights (``set_prepacking(False)`` restores every released one at once).
_owners: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _weight(mod: nn.Module) -> torch.Tensor:
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w


def _version(w: torch.Tensor) -> int:
    """In-place writes bump it; an inference tensor has none (-1), it cannot be written outside
    inference mode."""
    return -1 if w.is_inference() else w._version


def packed(
    owner: nn.Module, slot: str, mods: tuple[nn.Module, ...], release: bool = True
) -> PackedLinear | None:
    """The packed weight of ``mods`` cached on ``owner`` under ``slot`` (packed on first use, re-packed
    after a change), or None when prepacking is off or a module is not a plain fp32 CPU ``nn.Linear``;
    then the modules have their own weights back. ``release``: free the modules' own weight storage
    (False for a weight something else also reads, as a tied LM head)."""
    cached: PackedLinear | None = owner.__dict__.get(slot)
    if cached is not None:
        if _enabled and cached.matches(mods):
            return cached
        cached.restore()  # before anything runs the modules (or re-packs them) again
        del owner.__dict__[slot]
    if not _enabled or not _packable(mods):
        return None
    cached = _pack(mods, release)
    owner.__dict__[slot] = cached
    _owners.add(owner)
    return cached


def linear(
    owner: nn.Module, slot: str, mod: nn.Module, x: torch.Tensor, release: bool = True
) -> torch.Tensor:
    """``mod(x)`` through its packed weight when it has one. The cache lives on ``owner`` (the module
    holding ``mod`` as an attribute), not on ``mod``: when ``mod`` is swapped for a wrapper, the next
    call still finds the old cache and gives the wrapped module its weight back."""
    p = packed(owner, slot, (mod,), release)
    if p is None:
        out: torch.Tensor = mod(x)
        return out
    return p(x)
