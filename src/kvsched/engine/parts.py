"""Builds the parts the engine drives: model + tokenizer, KV storage and manager, scheduler, runner.

Kept apart from the engine loop (engine/engine.py) so tests can build an engine from an already-loaded
model (a tiny random-weight checkpoint) and so the byte-budget → block arithmetic lives in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError, InvalidRequestError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.peft import PeftCache
from kvsched.core.protocols import Scheduler
from kvsched.core.scheduler import make_scheduler
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.model_runner import ModelRunner

if TYPE_CHECKING:  # the tokenizers library loads only with a model that has a tokenizer
    from kvsched.engine.lora import LoraRegistry
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
    #: Speculative decoding with a draft model: the model, its KV tensors and its KV manager (which the
    #: scheduler keeps at the main cache's capacity for every scheduled request).
    draft_model: LlamaForCausalLM | None = None
    draft_storage: TensorKVStorage | None = None
    draft_kv: KVCacheManager | None = None
    #: Multi-LoRA (``EngineArgs.lora_modules``): the loaded adapters and the page budget the scheduler
    #: enforces (None without adapters: the base path is untouched).
    lora: LoraRegistry | None = None
    peft_cache: PeftCache | None = None

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
    if args.quantization is not None:  # also a model given in ``loaded`` (quantized in place, once)
        from kvsched.engine.quant import quantize_model

        quantize_model(model, args.quantization)
    max_len = args.max_model_len or model_config.max_position_embeddings
    if max_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={max_len} is invalid: the model supports "
            f"{model_config.max_position_embeddings} positions"
        )
    draft_model = _draft_model(args, model, model_config, dtype, device)
    bpb = kv_bytes_per_block(model_config, args.tokens_per_block, dtype)
    draft_bpb = (
        0 if draft_model is None else kv_bytes_per_block(draft_model.config, args.tokens_per_block, dtype)
    )
    # Without its own budget the draft pool comes out of the device budget: both get the same block count.
    shared = draft_model is not None and args.draft_kv_bytes is None
    cache_config = args.cache_config(bpb + draft_bpb if shared else bpb)
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
    draft_storage = draft_kv = None
    if draft_model is not None:
        draft_cfg = dataclasses.replace(cache_config, enable_kv_events=False)
        if args.draft_kv_bytes is not None:
            blocks = args.draft_kv_bytes // draft_bpb
            if blocks < 1:
                raise ConfigError(
                    f"draft_kv_bytes={args.draft_kv_bytes} is invalid: smaller than one draft KV block "
                    f"({draft_bpb} bytes)"
                )
            draft_cfg = dataclasses.replace(draft_cfg, num_device_blocks=blocks)
        dc = draft_model.config
        draft_storage = TensorKVStorage(
            draft_cfg, dc.num_layers, dc.num_kv_heads, dc.head_dim, dtype=dtype, device=device
        )
        draft_kv = KVCacheManager(draft_cfg, storage=draft_storage)
        sched_kwargs["draft_kv_cache_manager"] = draft_kv
    lora = peft = residency = None
    if args.lora_modules or args.enable_lora:
        from kvsched.engine.lora import AdapterResidency, LoraRegistry, install_lora

        lora = LoraRegistry.load(
            args.lora_modules or {}, model_config, dtype=dtype, page_bytes=args.lora_page_bytes
        )
        _, wrappers = install_lora(model, lora.adapters.items())
        peft = lora.peft_cache(args.max_lora_pages)
        residency = AdapterResidency(lora, peft, wrappers, device)
        sched_kwargs["peft_cache"] = peft
    scheduler = make_scheduler(args.scheduler, kv, **sched_kwargs)
    runner = ModelRunner(model, storage, cache_config, lora=residency)
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
        draft_model=draft_model,
        draft_storage=draft_storage,
        draft_kv=draft_kv,
        lora=lora,
        peft_cache=peft,
    )


def _draft_model(
    args: EngineArgs, target: LlamaForCausalLM, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM | None:
    """The draft model of ``speculative="draft"``: a checkpoint, or a truncated copy of the target."""
    if args.speculative != "draft":
        return None
    if args.draft_model is None:
        from kvsched.engine.speculative.draft_model import truncated_copy

        n = args.draft_num_layers or max(1, config.num_layers // 4)
        try:
            return truncated_copy(target, n)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    from kvsched.engine.weights.loader import load_model

    draft, draft_config, _ = load_model(
        args.draft_model, dtype=dtype, device=device, seed=args.seed, quantization=args.quantization
    )
    if draft_config.vocab_size != config.vocab_size:
        raise ConfigError(
            f"draft_model {args.draft_model!r} has a vocabulary of {draft_config.vocab_size} tokens, the "
            f"target {config.vocab_size}: a draft must share the target's vocabulary"
        )
    return draft
