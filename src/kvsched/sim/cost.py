"""Step cost: how long one scheduled batch takes on the modelled GPUs.

`StepShape` is the batch reduced to a few sums (built in O(batch) by the replica); a cost model maps it
to seconds. `RooflineCostModel` is analytic (public peaks x efficiency factors); `LinearCostModel` is a
least-squares fit to measured step times (used to calibrate against a real engine; the measured
inputs of that fit, a GEMM profile and the copy cost, are `sim/calibration.py`'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvsched.core.errors import ConfigError
from kvsched.sim.calibration import GemmProfile, nnls_relative
from kvsched.sim.calibration import fit_copy_cost as fit_copy_cost  # re-exported: its old home
from kvsched.sim.hardware import GpuSpec
from kvsched.sim.lora import LoraSpec
from kvsched.sim.models import ModelSpec


@dataclass(slots=True)
class StepShape:
    """One step's batch as sums: what a roofline needs, independent of the scheduler."""

    num_tokens: int = 0  # query tokens run this step
    num_seqs: int = 0
    num_logits: int = 0  # rows that go through the LM head
    attn_pairs: int = 0  # causal (query, key) pairs
    kv_read_tokens: int = 0  # per sequence: its KV length after the step, summed
    h2d_bytes: float = 0.0  # host -> device copies (resumes, host-tier prefix hits)
    d2h_bytes: float = 0.0  # device -> host copies (suspends)
    copy_calls: int = 0  # block-copy calls of the KV manager behind those bytes (both directions)
    lora_tokens: int = 0  # query tokens of requests with an adapter
    lora_adapters: int = 0  # distinct adapters in the step (each one's weights read once)
    lora_load_bytes: float = 0.0  # adapters copied host -> device before this step's forward
    # The prefill chunks' part of num_tokens / attn_pairs / kv_read_tokens (the rest is decodes): their
    # attention is its own kernel, so the cost model bounds each part by its own roofline.
    ctx_tokens: int = 0
    ctx_pairs: int = 0
    ctx_kv_tokens: int = 0

    def reset(self) -> None:
        self.num_tokens = self.num_seqs = self.num_logits = 0
        self.attn_pairs = self.kv_read_tokens = 0
        self.ctx_tokens = self.ctx_pairs = self.ctx_kv_tokens = 0
        self.h2d_bytes = self.d2h_bytes = 0.0
        self.copy_calls = 0
        self.lora_tokens = self.lora_adapters = 0
        self.lora_load_bytes = 0.0

    def add_context(self, start: int, chunk: int, last: bool) -> None:
        """A prefill chunk of `chunk` tokens at positions [start, start + chunk)."""
        pairs = chunk * start + chunk * (chunk + 1) // 2
        self.num_tokens += chunk
        self.num_seqs += 1
        self.attn_pairs += pairs
        self.kv_read_tokens += start + chunk
        self.ctx_tokens += chunk
        self.ctx_pairs += pairs
        self.ctx_kv_tokens += start + chunk
        if last:
            self.num_logits += 1

    def add_decode(self, kv_len: int, num_new: int = 1) -> None:
        """A decode of `num_new` tokens (1 + drafts) after `kv_len` cached tokens."""
        self.num_tokens += num_new
        self.num_seqs += 1
        self.attn_pairs += num_new * kv_len + num_new * (num_new + 1) // 2
        self.kv_read_tokens += kv_len + num_new
        self.num_logits += num_new

    def features(self) -> list[float]:
        """Regressors of `LinearCostModel` (the constant term first)."""
        return [
            1.0,
            float(self.num_tokens),
            float(self.attn_pairs),
            float(self.kv_read_tokens),
            float(self.num_seqs),
            float(self.num_logits),
        ]


FEATURE_NAMES = ("step", "token", "attn_pair", "kv_token", "seq", "logit")
GEMM_FEATURE = "gemm"  # LinearCostModel's extra feature with a GemmProfile: its seconds for the step


class CostModel(Protocol):
    def step_time(self, shape: StepShape) -> float: ...


@dataclass(slots=True)
class RooflineCostModel:
    """Linear layers: max(FLOPs, weight bytes); attention: max(FLOPs, KV bytes) for the prefill chunks
    and again for the decodes; plus overheads.

    Weights are read once per step whatever the batch, KV once per sequence, so the model captures both
    why batching pays off and why long contexts make decode memory-bound. Prefill and decode attention
    are separate kernels (TensorRT-LLM's context FMHA vs its generation XQA/MMHA kernels, docs
    `advanced/gpt-attention.md`; FlashInfer's prefill vs decode wrappers in vLLM/SGLang), so a step pays
    both rooflines: one max() over the whole batch would hide the decodes' KV reads under a long
    prefill chunk's FLOPs (up to half the attention time of a 32k-token prompt next to long decodes).
    LoRA (`lora`): the adapters' shrink/expand GEMMs run as their own kernels (as Punica's SGMV /
    S-LoRA), so they add max(adapter FLOPs, each distinct adapter's bytes read once); loading an adapter
    is a host -> device copy the forward waits for, so it is never overlapped.
    """

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    step_overhead: float = 2e-3  # s: scheduling, input preparation, launches, sampling
    allreduce_latency: float = 8e-6  # s per all-reduce
    overlap_copies: bool = True  # host<->device copies run on their own stream
    lora: LoraSpec | None = None  # adapter shape (None: LoRA requests cost as base ones)

    _s_token: float = field(init=False, repr=False)
    _s_logit: float = field(init=False, repr=False)
    _s_weights: float = field(init=False, repr=False)
    _s_pair: float = field(init=False, repr=False)
    _s_kv: float = field(init=False, repr=False)
    _s_reduce: float = field(init=False, repr=False)
    _s_link: float = field(init=False, repr=False)
    _s_lora_token: float = field(init=False, repr=False)
    _s_lora_adapter: float = field(init=False, repr=False)

    def _check(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ConfigError(f"tp={self.tp!r} is invalid: must be an integer >= 1")
        if self.model.num_heads % self.tp:
            raise ConfigError(
                f"tp={self.tp} does not divide num_heads={self.model.num_heads} of {self.model.name}"
            )
        if self.step_overhead < 0 or self.allreduce_latency < 0:
            raise ConfigError("step_overhead and allreduce_latency must be >= 0")
        if self.tp > 1 and self.gpu.gpu_link_bandwidth <= 0:
            raise ConfigError(f"gpu {self.gpu.name} has no GPU link bandwidth: tp must be 1")

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes of one token on one GPU (what the block pool is sized by)."""
        return self.model.kv_bytes_per_token_per_gpu(self.tp)

    def __post_init__(self) -> None:
        self._check()
        m, g, tp = self.model, self.gpu, self.tp
        peak = g.gemm_flops(m.gemm_dtype)  # FP8 / FP4 weights at the GPU's FP8 / FP4 peak (sim/quant.py)
        eff = g.attention_efficiency
        # per-unit seconds, computed once (step_time runs once per simulated step)
        self._s_token = m.linear_flops_per_token / (tp * peak * g.mfu)
        self._s_logit = m.lm_head_flops_per_token / (tp * g.gemm_flops(m.head_gemm_dtype) * g.mfu)
        self._s_weights = m.weight_bytes_per_step / (tp * g.hbm_bandwidth * g.hbm_efficiency)
        # score FLOPs at the KV dtype's tensor rate, capped by the softmax exponentials (GpuSpec)
        self._s_pair = m.attn_flops_per_pair / (tp * g.attention_flops(m.attn_dtype, m.head_dim) * eff)
        self._s_kv = self.kv_bytes_per_token / (g.hbm_bandwidth * eff)
        self._s_reduce = 0.0
        if tp > 1:
            self._s_reduce = 2 * m.num_layers * 2.0 * (tp - 1) / tp * m.hidden_size * 2.0
            self._s_reduce /= g.gpu_link_bandwidth * g.gpu_link_efficiency
        self._s_link = 1.0 / (g.host_link_bandwidth * g.host_link_efficiency)
        self._s_lora_token = self._s_lora_adapter = 0.0
        if self.lora is not None:  # adapters are sharded with the linears they wrap
            self._s_lora_token = self.lora.flops_per_token(m) / (tp * g.gemm_flops("bf16") * g.mfu)
            self._s_lora_adapter = self.lora.adapter_bytes(m) / (tp * g.hbm_bandwidth * g.hbm_efficiency)

    @property
    def lora_adapter_bytes(self) -> float:
        """Bytes of one adapter (0 without `lora`): what loading it copies host -> device."""
        return 0.0 if self.lora is None else self.lora.adapter_bytes(self.model)

    def lora_time(self, s: StepShape) -> float:
        """Seconds of the step's adapter GEMMs: max(FLOPs, distinct adapters' weight reads)."""
        if not s.lora_tokens:
            return 0.0
        return max(s.lora_tokens * self._s_lora_token, s.lora_adapters * self._s_lora_adapter)

    def attention_time(self, s: StepShape) -> float:
        """max(score FLOPs, KV bytes read + written) of the prefill chunks, plus the same of the decodes."""
        pair, kv = self._s_pair, self._s_kv
        c_flops, c_bytes = s.ctx_pairs * pair, (s.ctx_kv_tokens + s.ctx_tokens) * kv
        g_flops = (s.attn_pairs - s.ctx_pairs) * pair
        g_bytes = (s.kv_read_tokens - s.ctx_kv_tokens + s.num_tokens - s.ctx_tokens) * kv
        return (c_flops if c_flops > c_bytes else c_bytes) + (g_flops if g_flops > g_bytes else g_bytes)

    def breakdown(self, s: StepShape) -> dict[str, float]:
        """Seconds per component: linear, attention, allreduce, overhead, copy, lora, lora_load."""
        out = {"linear": 0.0, "attention": 0.0, "allreduce": 0.0, "overhead": 0.0, "copy": 0.0}
        out["lora"] = self.lora_time(s)
        out["lora_load"] = s.lora_load_bytes * self._s_link
        if s.num_tokens > 0:
            out["linear"] = max(s.num_tokens * self._s_token + s.num_logits * self._s_logit, self._s_weights)
            out["attention"] = self.attention_time(s)
            if self.tp > 1:  # two ring all-reduces of the activations per layer
                lat = 2 * self.model.num_layers * self.allreduce_latency
                out["allreduce"] = s.num_tokens * self._s_reduce + lat
            out["overhead"] = self.step_overhead
        out["copy"] = max(s.h2d_bytes, s.d2h_bytes) * self._s_link  # each direction has its own lanes
        return out

    def step_time(self, shape: StepShape) -> float:
        """`breakdown` summed, without building the dict (this runs once per simulated step)."""
        n = shape.num_tokens
        compute = 0.0
        if n > 0:
            lin = n * self._s_token + shape.num_logits * self._s_logit
            w = self._s_weights
            compute = (lin if lin > w else w) + self.attention_time(shape) + self.step_overhead
            if self.tp > 1:
                compute += n * self._s_reduce + 2 * self.model.num_layers * self.allreduce_latency
            if shape.lora_tokens:
                compute += self.lora_time(shape)
        compute += shape.lora_load_bytes * self._s_link  # the forward waits for its adapters
        h2d, d2h = shape.h2d_bytes, shape.d2h_bytes
        if not (h2d or d2h):
            return compute
        copy = (h2d if h2d > d2h else d2h) * self._s_link
        if self.overlap_copies:
            return compute if compute > copy else copy
        return compute + copy

    def copy_time(self, num_bytes: float) -> float:
        return num_bytes * self._s_link


@dataclass(slots=True)
class LinearCostModel:
    """t = c . features(shape) + copy time; coefficients fitted to measured step times.

    With ``gemm`` (a `GemmProfile`: the engine's dense layers timed per row count) the features end with
    one more, ``GEMM_FEATURE``: the profile's seconds for the step's tokens and logits, so a CPU BLAS's
    non-linear cost in the batch size (`sim/calibration.py`) is the engine's, not a line through it.
    Copy time = ``copy_calls x copy_overhead`` + bytes / ``host_link_bandwidth``, the bytes of both
    directions added unless ``duplex`` (a GPU's PCIe/NVLink-C2C link has lanes each way; a CPU engine's
    host<->device copies are memcpys one after the other). With ``overlap_copies`` the copies run beside
    the forward (a side stream), else before it. `fit_copy_cost` fits the two copy terms to timed calls.
    """

    coefficients: tuple[float, ...]
    host_link_bandwidth: float = 55e9  # effective B/s per direction
    overlap_copies: bool = True
    copy_overhead: float = 0.0  # s per block-copy call (launch, index handling)
    duplex: bool = True
    gemm: GemmProfile | None = None

    def __post_init__(self) -> None:
        names = self.feature_names
        if len(self.coefficients) != len(names):
            raise ConfigError(f"LinearCostModel needs {len(names)} coefficients {names}")
        if not self.host_link_bandwidth > 0 or self.copy_overhead < 0:
            raise ConfigError(
                f"host_link_bandwidth={self.host_link_bandwidth} must be > 0 and "
                f"copy_overhead={self.copy_overhead} >= 0"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES if self.gemm is None else (*FEATURE_NAMES, GEMM_FEATURE)

    def features(self, shape: StepShape) -> list[float]:
        """The regressors of ``shape``: `StepShape.features`, then the GEMM profile's seconds if any."""
        return _features(shape, self.gemm)

    def copy_time(self, shape: StepShape) -> float:
        """Seconds of the step's host<->device block copies (0 when nothing moves)."""
        h2d, d2h = shape.h2d_bytes, shape.d2h_bytes
        moved = (h2d if h2d > d2h else d2h) if self.duplex else h2d + d2h
        return shape.copy_calls * self.copy_overhead + moved / self.host_link_bandwidth

    def step_time(self, shape: StepShape) -> float:
        compute = 0.0
        if shape.num_tokens:
            compute = sum(c * f for c, f in zip(self.coefficients, _features(shape, self.gemm)))
        compute += shape.lora_load_bytes / self.host_link_bandwidth  # the forward waits for its adapters
        if not (shape.copy_calls or shape.h2d_bytes or shape.d2h_bytes):
            return compute
        copy = self.copy_time(shape)
        return max(compute, copy) if self.overlap_copies else compute + copy

    @classmethod
    def fit(
        cls,
        shapes: Sequence[StepShape],
        times: Sequence[float],
        gemm: GemmProfile | None = None,
        **kwargs: object,
    ) -> LinearCostModel:
        """Non-negative least squares on relative error (each row weighted by 1/t), so short steps count;
        ``gemm`` adds the profile's feature (its coefficient ~1 when the profile matches the engine)."""
        count = len(FEATURE_NAMES) + (gemm is not None)
        if len(shapes) != len(times) or len(shapes) < count:
            raise ConfigError(f"fit needs >= {count} (shape, time) pairs of equal count")
        x = np.array([_features(s, gemm) for s in shapes], dtype=np.float64)
        coef = nnls_relative(x, np.asarray(times, dtype=np.float64))
        return cls(tuple(float(c) for c in coef), gemm=gemm, **kwargs)  # type: ignore[arg-type]


def _features(shape: StepShape, gemm: GemmProfile | None) -> list[float]:
    f = shape.features()
    if gemm is not None:
        f.append(gemm.seconds(shape.num_tokens, shape.num_logits))
    return f
