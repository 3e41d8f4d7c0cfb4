"""Builds the parts the engine drives: model + tokenizer, KV storage and manager, scheduler, runner.

Kept apart from the engine loop (engine/engine.py) so tests can build an engine from an already-loaded
model (a tiny random-weight checkpoint) and so the byte-budget → block arithmetic lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError, InvalidRequestError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.protocols import Scheduler
from kvsched.core.scheduler import make_scheduler
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.model_runner import ModelRunner

if TYPE_CHECKING:  # the tokenizers library loads only with a model that has a tokenizer
    from kvsched.engine.tokenizer import Tokenizer

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineParts:
    """The assembled engine parts (no request state)."""

    model: LlamaForCausalLM
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    cache_config: CacheConfig
    storage: TensorKVStorage
    kv: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    device: torch.device
    max_model_len: int

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.eos_token_ids)
        return tuple(sorted(ids))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompt token ids, not text")
        return list(self.tokenizer.encode(text))

    def apply_chat_template(
        self, conversation: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so it has no chat template")
        return list(
            self.tokenizer.encode_chat(
                [dict(m) for m in conversation], add_generation_prompt=add_generation_prompt
            )
        )


def kv_bytes_per_block(config: ModelConfig, tokens_per_block: int, dtype: torch.dtype) -> int:
    """K and V of one block over all layers."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * tokens_per_block * elem


def build_engine_parts(
    args: EngineArgs, loaded: tuple[LlamaForCausalLM, ModelConfig, Tokenizer | None] | None = None
) -> EngineParts:
    """Load the model (or take ``loaded`` = (model, config, tokenizer)) and assemble the engine."""
    dtype = _TORCH_DTYPES[args.dtype]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device")
    if loaded is None:
        from kvsched.engine.weights.loader import load_model

        loaded = load_model(args.model, dtype=dtype, device=device, seed=args.seed)
    model, model_config, tokenizer = loaded
    max_len = args.max_model_len or model_config.max_position_embeddings
    if max_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={max_len} is invalid: the model supports "
            f"{model_config.max_position_embeddings} positions"
        )
    cache_config = args.cache_config(kv_bytes_per_block(model_config, args.tokens_per_block, dtype))
    storage = TensorKVStorage(
        cache_config,
        model_config.num_layers,
        model_config.num_kv_heads,
        model_config.head_dim,
        dtype=dtype,
        device=device,
    )
    kv = KVCacheManager(cache_config, storage=storage)
    sched_kwargs: dict[str, Any] = {
        "max_batch_size": args.max_batch_size,
        "max_num_tokens": args.max_num_tokens,
        "chunk_unit_size": args.chunk_unit_size,
        "policy": args.capacity_policy,  # None unless given; make_scheduler refuses it where unused
        "priority_mode": args.priority_mode,
    }
    scheduler = make_scheduler(args.scheduler, kv, **sched_kwargs)
    runner = ModelRunner(model, storage, cache_config)
    return EngineParts(
        model=model,
        model_config=model_config,
        tokenizer=tokenizer,
        cache_config=cache_config,
        storage=storage,
        kv=kv,
        scheduler=scheduler,
        runner=runner,
        device=device,
        max_model_len=max_len,
    )
