"""Tokenizer from the checkpoint (GGUF metadata or an HF folder), chat template, streaming detokenizer.

GGUF files carry a byte-level BPE vocabulary (``tokenizer.ggml.tokens/merges/token_type``); we rebuild it
as a ``tokenizers`` BPE with the pre-tokenizer the file's ``tokenizer.ggml.pre`` names. HF folders
ship ``tokenizer.json`` directly. The chat template is the checkpoint's jinja2 template, rendered in a
sandbox with the same options as HF (trim_blocks, lstrip_blocks, loop controls).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from kvsched.core.errors import InvalidRequestError
from kvsched.engine.weights.errors import ModelNotFoundError, UnsupportedModelError

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _gguf_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":  # GPT-2 split with each digit on its own (as llama.cpp's "smollm" pre-tokenizer)
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


class Tokenizer:
    """encode / decode / chat template over a ``tokenizers`` backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        chat_template: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
    ) -> None:
        self.backend = backend
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template: Any = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        alphabet = _byte_alphabet()
        allowed = set(alphabet.values())
        spelled = [
            t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens
        ]
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and set(t) <= allowed
        ]
        backend.add_special_tokens(specials)
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types)
                if ty == _USER_DEFINED
            ]
        )
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)]
            )
        return cls(
            backend,
            eos_token_ids=() if eos is None else (int(eos),),
            bos_token_id=bos,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=tokens[bos] if bos is not None else "",
            eos_token=tokens[eos] if eos is not None else "",
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{folder}: no tokenizer.json")
        backend = Backend.from_file(str(path))
        cfg = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        bos_tok, eos_tok = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos_ids: list[int] = []
        if eos_tok and backend.token_to_id(eos_tok) is not None:
            eos_ids.append(backend.token_to_id(eos_tok))
        gen_eos = gen.get("eos_token_id")
        eos_ids.extend(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
        return cls(
            backend,
            eos_token_ids=eos_ids,
            bos_token_id=backend.token_to_id(bos_tok) if bos_tok else None,
            chat_template=template if isinstance(template, str) else None,
            bos_token=bos_tok,
            eos_token=eos_tok,
        )

    # -- text <-> ids -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the checkpoint's template."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat (the template writes its own special tokens)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


class TokenDecoder(Protocol):
    """What :class:`IncrementalDetokenizer` needs from a tokenizer."""

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


#: Prompt tokens decoded together with the first outputs, so a leading space comes out as in the full text.
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Streams text as tokens arrive, holding back bytes of a character split over several tokens.

    The engine's one detokenizer (the engine's :class:`kvsched.engine.text_stream.TextStream` wraps
    it). Each call decodes only a short window (from the last emitted boundary), so a stream costs
    O(tokens); the offsets are vLLM's ``prefix_offset`` / ``read_offset`` scheme.
    """

    __slots__ = ("tokenizer", "skip_special_tokens", "ids", "prefix_offset", "read_offset", "text")

    def __init__(
        self, tokenizer: TokenDecoder, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (may be empty)."""
        self.ids.extend(token_ids)
        dec = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = dec(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = dec(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: whatever is held back, incomplete characters as U+FFFD."""
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip
        )
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return tok or ""


def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template: {message}")

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=False)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"the model's chat template does not parse: {exc}") from exc
