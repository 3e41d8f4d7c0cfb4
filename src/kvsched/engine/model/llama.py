"""Llama-family decoder (Llama, Mistral, Qwen2) running one flattened mixed batch over a paged cache.

Module names mirror HF's (``model.layers.N.self_attn.q_proj`` ...) so checkpoints map one to one.
On CPU fp32 the projections run on oneDNN-prepacked weights, q|k|v and gate|up as one matmul each
(``packed.py``: 1.5x the matmul throughput of ``F.linear`` at decode batch sizes); LoRA-wrapped or
quantized projections keep their own modules' forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from kvsched.engine.forward_batch import ForwardBatch
from kvsched.engine.model.attention import AttentionPlan, paged_attention
from kvsched.engine.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary_signed
from kvsched.engine.model.packed import linear, packed
from kvsched.engine.model_config import ModelConfig

if TYPE_CHECKING:
    from kvsched.engine.step_profile import StepProfile


class KVTensors(Protocol):
    """What the model needs of a KV storage backend: one device tensor per layer."""

    device_kv: list[torch.Tensor]  # [num_blocks, 2, tokens_per_block, num_kv_heads, head_dim]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qk_out = q_out + kv_out  # where v starts in the fused q|k|v output
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        """``sin`` is the signed table of ``RotaryEmbedding`` (see ``apply_rotary_signed``)."""
        t, nh, hd = x.shape[0], self.num_heads, self.head_dim
        fused = packed(self, "_kvsched_packed_qkv", (self.q_proj, self.k_proj, self.v_proj))
        if fused is None:
            q = apply_rotary_signed(self.q_proj(x).view(t, nh, hd), cos, sin)
            k = apply_rotary_signed(self.k_proj(x).view(t, self.num_kv_heads, hd), cos, sin)
            v = self.v_proj(x).view(t, self.num_kv_heads, hd)
        else:  # one matmul over q|k|v; RoPE once over the q and k heads together
            qkv = fused(x)
            qk_out = self.qk_out
            qk = apply_rotary_signed(qkv[:, :qk_out].view(t, -1, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, qk_out:].view(t, self.num_kv_heads, hd)
        return linear(self, "_kvsched_packed_o", self.o_proj, paged_attention(q, k, v, cache, plan))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head; ``forward(batch, kv_storage)`` returns logits of ``batch.logits_indices``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        #: Set by ``engine.lora.install_lora``: the LoRA layers read each batch's adapter groups from it.
        self.lora_context: Any = None
        #: Set by the engine with ``EngineArgs.profile_steps``: attention times its K/V gathers into it.
        self.profile: StepProfile | None = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_storage: KVTensors) -> torch.Tensor:
        caches = kv_storage.device_kv
        if len(caches) != self.config.num_layers:
            raise ValueError(f"KV storage has {len(caches)} layers, the model {self.config.num_layers}")
        plan = AttentionPlan.build(batch, self.config.sliding_window)
        plan.profile = self.profile
        lora = self.lora_context
        if lora is None:
            return self._forward(batch, caches, plan)
        lora.groups = batch.lora_groups
        try:
            return self._forward(batch, caches, plan)
        finally:
            lora.groups = None

    def _forward(self, batch: ForwardBatch, caches: list[torch.Tensor], plan: AttentionPlan) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(batch.input_ids)
        cos, sin = m.rotary(batch.positions, x.dtype)  # sin signed (RotaryEmbedding.forward)
        for layer, cache in zip(m.layers, caches):
            x = layer(x, cos, sin, cache, plan)
        x = m.norm(x.index_select(0, batch.logits_indices))
        # The head keeps its weight: a tied one is the embedding's, and a draft model (speculative
        # decoding's truncated copy) shares the head module under another owner.
        return linear(self.lm_head, "_kvsched_packed", self.lm_head, x, release=False).float()
