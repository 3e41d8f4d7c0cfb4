"""The Llama-family decoder with paged attention."""

from kvsched.engine.model.attention import AttentionPlan, paged_attention
from kvsched.engine.model.llama import LlamaForCausalLM

__all__ = ["AttentionPlan", "LlamaForCausalLM", "paged_attention"]
