"""The front-end's share of the engine's work: tokenizing and checking a request before it is routed.

Tokenizing stays on the front-end (the replicas receive token ids, which the KV-aware router hashes
too); the checks are ``Engine.add_request``'s own (``engine/request_checks.py``), with the same typed errors, so
a bad request is a 400 from the replicated server exactly as from a single engine, before any replica
sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvsched.core.errors import InvalidRequestError
from kvsched.core.request import SamplingParams
from kvsched.engine.logprobs import check_num_logprobs
from kvsched.engine.request_checks import check_cache_salt, check_priority, check_prompt
from kvsched.engine.tokenizer import Tokenizer
from kvsched.engine.weights.errors import ModelNotFoundError
from kvsched.engine.weights.gguf_file import GGUFFile
from kvsched.engine.weights.loader import resolve_path
from kvsched.serve.backend import gil_free_encoder
from kvsched.serve.replicas.replica import ReplicaInfo


def load_tokenizer(model: str | None) -> Tokenizer:
    """The tokenizer of ``model`` (GGUF file, HF folder, None = the default model), without its weights."""
    path = resolve_path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF file, as the engine's loader accepts
            path = ggufs[0]
    if path.is_file():
        meta = GGUFFile(path).metadata
        if "tokenizer.ggml.tokens" not in meta:
            raise ModelNotFoundError(f"{path}: the GGUF has no tokenizer; the server needs one")
        return Tokenizer.from_gguf_metadata(meta)
    return Tokenizer.from_folder(Path(path))


class FrontTokenizer:
    """``encode`` / ``encode_chat`` / ``token_text`` as ``EngineBackend`` does them, over a tokenizer only."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._fast = gil_free_encoder(tokenizer)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast(text, True)
        return list(self._tokenizer.encode(text))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        render = getattr(self._tokenizer, "apply_chat_template", None)
        if self._fast is not None and render is not None:
            text = render([dict(m) for m in messages], add_generation_prompt=True)
            return self._fast(text, False)
        return list(self._tokenizer.encode_chat([dict(m) for m in messages], add_generation_prompt=True))

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])


def check_request(
    info: ReplicaInfo,
    token_ids: list[int],
    params: SamplingParams,
    priority: int,
    cache_salt: int | None,
    lora: str | None,
) -> None:
    """Raise what ``Engine.add_request`` would raise for this request on a replica described by ``info``."""
    params.validate()
    check_num_logprobs(params.logprobs)
    check_priority(priority)
    check_cache_salt(cache_salt)
    if lora is not None and lora not in info.lora_names:
        raise InvalidRequestError(f"unknown LoRA adapter {lora!r}; loaded: {sorted(info.lora_names)}")
    check_prompt(
        token_ids,
        params.max_tokens,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        tokens_per_block=info.tokens_per_block,
        num_device_blocks=info.num_device_blocks,
    )
