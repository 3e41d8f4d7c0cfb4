"""Opt-in weight quantization (``quantization="int8"`` or ``"int4"``), applied once after loading.

Why: fp32 decode at batch 1 reads every weight once per token, so its speed is the memory bandwidth
divided by ~540 MB on SmolLM2-135M. Both kinds replace each projection of every decoder layer:

* ``int8`` (any checkpoint): :class:`Int8Linear`, symmetric int8 per output channel (scale = the row's
  max |w| / 127), the LM head too. Kernel, chosen by measurement (``benchmarks/decode.py``, torch 2.13
  CPU): ``aten._weight_int8pack_mm`` with bf16 activations. Its fp32-activation variant was ~25x slower
  than fp32 ``linear``; ``torch._int_mm`` (int8 activations, one scale per token) agreed less often with
  fp32 greedy output; ``torch.ao.quantization.quantize_dynamic`` builds on quantized tensors, deprecated
  in torch 2.13. Off the CPU the layer dequantizes on the fly (correct, not fast).
* ``int4`` (CPU): :class:`Int4Linear`, 4-bit codes per group of 32 input channels with a scale and a
  minimum, the layout of GGUF Q4_1. The default GGUF stores its projections as Q4_1, so this recovers the
  file's own 4-bit codes exactly; what differs from fp32 is bf16 rounding (activations, and the scales
  and zero points, which the kernel takes in the activation dtype). The LM head stays fp32 (the GGUF's
  is the Q8_0 embedding, which 4 bits would change).

The token embedding always stays fp32 (a step reads one row per token, not the table). Outputs come
back in the activation's dtype, so the rest of the model is unchanged.

Measured (SmolLM2 GGUF, 1 thread, busy 2-core machine): batch-1 decode tokens per CPU second fp32 17.7,
int8 30.7, int4 35.2; greedy outputs identical to fp32 on 4 of 16 built-in prompts (int8) and 13 of 16
(int4) over 32 tokens. Both are latency options: at 32 decoding sequences the weight reads are shared
by the batch and these kernels are no faster than fp32 GEMM (0.8-1.1x; ``_int_mm`` would be ~2x there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvsched.core.errors import ConfigError
from kvsched.engine.engine_args import check_quantization
from kvsched.engine.model.packed import restore_weights

#: Projections of a decoder layer that are quantized (HF names; attention, then MLP).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (int8 [out, in], fp32 scale [out]) with ``weight ~ q * scale[:, None]``.

    Symmetric: the range is [-127, 127] (no -128), so ``-w`` quantizes to ``-q``. An all-zero row gets
    scale 1 (its codes are 0), never a division by zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """``x @ (q * scale[:, None]).T + bias`` with ``q`` int8 per output channel (see the module doc)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        if scale.shape != (qweight.shape[0],):
            raise ValueError(f"scale must have shape ({qweight.shape[0]},), got {tuple(scale.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        # The kernel takes its scales in the activation dtype (bf16); the fp32 copy serves other devices.
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        q: torch.Tensor = self.qweight
        if q.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), q, self.scale_bf16).to(x.dtype)
        else:
            y = nn.functional.linear(flat, q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


#: Input channels per int4 group: the block of GGUF Q4_0 / Q4_1 (and a group size the kernel takes).
INT4_GROUP = 32


def quantize_groupwise_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (codes 0..15 int32 [out, in], scale and minimum fp32 [out, in / 32]) with
    ``weight ~ codes * scale + minimum`` per group of 32 input channels (asymmetric, as GGUF Q4_1).

    A weight that was a Q4_1 block comes back exactly: the block's minimum has code 0 and its maximum
    code 15 (llama.cpp's ``quantize_row_q4_1`` picks d = (max - min) / 15), so both are recovered."""
    out_f, in_f = weight.shape
    if in_f % INT4_GROUP:
        raise ConfigError(f"int4 needs in_features divisible by {INT4_GROUP}, got a weight of {out_f}x{in_f}")
    w = weight.detach().float().reshape(out_f, in_f // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: codes 0
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return codes.reshape(out_f, in_f), scale, lo


class Int4Linear(nn.Module):
    """4-bit codes per group of 32 input channels with a scale and a minimum each (CPU only).

    Kernel: ``aten._weight_int4pack_mm_for_cpu`` with bf16 activations (its fp32 variant was ~15x
    slower than fp32 ``linear``); it computes ``(code - 8) * scale + zero`` per group, so ``zero =
    minimum + 8 * scale``, and takes scales and zeros in bf16 only.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ConfigError("quantization='int4' is a CPU path (torch's int4 CPU kernel); use 'int8'")
        codes, scale, lo = quantize_groupwise_4bit(linear.weight)
        self.out_features, self.in_features = codes.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        zero = lo + 8 * scale
        # [in / 32, out, 2]: (scale, zero) per group and output channel, in the activation dtype
        self.register_buffer(
            "scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
        )
        b = linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scale_zero)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"
        )


def quantize_model(model: nn.Module, quantization: str | None) -> int:
    """Replace the decoder projections (and, for int8, the LM head) of ``model`` (a ``LlamaForCausalLM``)
    in place; returns how many linears were quantized. ``None`` leaves the model as it is (fp32 stays the
    default). A layer already quantized is skipped, so calling it twice is harmless. A tied LM head gets
    its own int8 copy; the embedding it was tied to stays fp32."""
    check_quantization(quantization)
    if quantization is None:
        return 0
    make = Int8Linear.from_linear if quantization == "int8" else Int4Linear
    restore_weights(model)  # a forward may have packed the projections and released their weights
    count = 0
    for layer in model.model.layers:  # type: ignore[union-attr]
        for parent, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for name in names:
                count += _replace(parent, name, make)
    if quantization == "int8":
        count += _replace(model, "lm_head", make)
    return count


def _replace(parent: nn.Module, name: str, make: Callable[[nn.Linear], nn.Module]) -> int:
    mod = getattr(parent, name)
    if isinstance(mod, Int8Linear | Int4Linear):
        return 0
    if not isinstance(mod, nn.Linear):
        raise ConfigError(
            f"cannot quantize {name}: it is a {type(mod).__name__}, not a plain nn.Linear "
            "(quantize before installing LoRA adapters)"
        )
    setattr(parent, name, make(mod))
    return 1
