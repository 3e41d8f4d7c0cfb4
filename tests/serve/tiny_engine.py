"""A tiny random-weight Llama with the default model's real tokenizer: fast, but real text and chat."""

from __future__ import annotations

from functools import lru_cache

from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.llm import LLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.loader import default_model_path, load_model

TINY = ModelConfig(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
ENGINE_KW = {"max_model_len": 512, "num_device_blocks": 2048, "tokens_per_block": 16, "max_batch_size": 64}


@lru_cache(maxsize=1)
def _loaded():
    return load_model(default_model_path(), dummy_config=TINY, seed=0)


def tiny_engine(**overrides) -> Engine:
    args = EngineArgs(**{**ENGINE_KW, **overrides})
    return Engine(args, parts=build_engine_parts(args, loaded=_loaded()))


def tiny_llm(**overrides) -> LLM:
    """``LLM`` over the tiny model (LLM's constructor only takes a path, so wrap an engine)."""
    llm = LLM.__new__(LLM)
    llm.engine = tiny_engine(**overrides)
    return llm
