"""LoRA in the forward pass: each adapted linear adds ``B(A(x))`` to the rows of its adapter's tokens.

The flattened batch carries ``lora_groups`` (adapter id -> the rows of its tokens); every adapted layer
runs one pair of small matmuls per adapter present in the step, over that adapter's rows only (the S-LoRA
/ Punica idea of grouping tokens by adapter, without a custom kernel), never the batch once per adapter.
A batch without adapter tokens takes the base path: one ``is None`` check per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvsched.engine.lora.adapter import TARGET_MODULES, LoraAdapter


@dataclass(slots=True)
class LoraContext:
    """The adapter groups of the forward under way, shared by every ``LoraLinear`` of one model."""

    groups: list[tuple[int, torch.Tensor]] | None = None


class LoraLinear(nn.Module):
    """A base ``nn.Linear`` plus the low-rank deltas of each loaded adapter that targets it."""

    def __init__(self, base: nn.Linear, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        #: adapter id -> (A [r, in], B*scaling [out, r]); plain tensors, not parameters.
        self.deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:  # code that reads a projection's weight keeps working
        w: torch.Tensor = self.base.weight
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        groups = self.ctx.groups
        if groups is None:
            return y
        for lora_id, rows in groups:
            ab = self.deltas.get(lora_id)
            if ab is None:
                continue  # this adapter does not target this module
            a, b = ab
            y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return y


def _wrap(parent: nn.Module, attr: str, ctx: LoraContext) -> LoraLinear:
    mod = getattr(parent, attr)
    if isinstance(mod, LoraLinear):  # installed before (a model reused by a second engine)
        mod.ctx = ctx
        return mod
    wrapped = LoraLinear(mod, ctx)
    setattr(parent, attr, wrapped)
    return wrapped


def install_lora(
    model: nn.Module, adapters: Iterable[tuple[int, LoraAdapter]]
) -> tuple[LoraContext, dict[tuple[int, str], LoraLinear]]:
    """Wrap the linears of ``model`` (a ``LlamaForCausalLM``) that some adapter targets; returns the
    shared context and the wrappers by (layer, module). Deltas are attached by ``AdapterResidency``
    when an adapter becomes resident; the forward applies them per token group."""
    ctx = LoraContext()
    for mod in model.modules():
        if isinstance(mod, LoraLinear):
            mod.deltas.clear()
    wrappers: dict[tuple[int, str], LoraLinear] = {}
    for _, adapter in adapters:
        wrap_targets(model, ctx, wrappers, adapter)
    model.lora_context = ctx  # type: ignore[assignment]
    return ctx, wrappers


def wrap_targets(
    model: nn.Module, ctx: LoraContext, wrappers: dict[tuple[int, str], LoraLinear], adapter: LoraAdapter
) -> None:
    """Wrap the linears ``adapter`` targets that are not wrapped yet (also for an adapter loaded at
    runtime); a wrapper without deltas costs the base path nothing but a dict lookup."""
    layers: Any = model.model.layers  # type: ignore[union-attr]
    for layer, module in adapter.weights:
        if (layer, module) in wrappers:
            continue
        block = layers[layer]
        parent = block.self_attn if module in TARGET_MODULES[:4] else block.mlp
        wrappers[(layer, module)] = _wrap(parent, module, ctx)
