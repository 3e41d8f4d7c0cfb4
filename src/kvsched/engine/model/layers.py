"""Building blocks of the Llama block: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from kvsched.engine.model.packed import linear, packed


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as HF does), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        # HF's ops in HF's order (bit-identical); in-place where the intermediate is ours alone.
        scale = x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        x = x * scale
        if x.dtype != dtype:
            x = x.to(dtype)
        return x.mul_(self.weight) if x.dtype == self.weight.dtype else self.weight * x


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary (non-contiguous) positions, in the rotate-half layout of HF."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin table (first half negated) that ``apply_rotary_signed`` takes."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]: broadcast over heads
        sin = emb.sin()
        sin[..., : sin.shape[-1] // 2].neg_()  # exact: HF's table, its first half negated
        return emb.cos().to(dtype), sin.to(dtype)


def apply_rotary_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half rotary bit for bit with one op less per call: HF's ``(-x2) * sin`` equals
    ``x2 * (-sin)`` exactly (IEEE products only XOR the signs), so the negation moves into the table.
    x: [T, H, D], any row stride (q and k heads of the fused projection are rotated in one call)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); plain nn.Linear so adapters can wrap them later."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = packed(self, "_kvsched_packed_gate_up", (self.gate_proj, self.up_proj))
        if fused is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:  # one matmul over gate|up
            gate, up = fused(x).split(self.gate_proj.out_features, dim=1)
        return linear(self, "_kvsched_packed_down", self.down_proj, nn.functional.silu(gate) * up)
