"""Tokenizer from GGUF metadata and from an HF folder; chat template; incremental detokenization."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched.core.errors import InvalidRequestError
from kvsched.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kvsched.engine.weights import ModelNotFoundError, UnsupportedModelError
from kvsched.engine.weights.gguf_file import GGUFFile
from kvsched.engine.weights.loader import default_model_path

MULTIBYTE = "naïve café — 🤗🚀 中文测试 Ωμέγα"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(default_model_path()).metadata)


def test_roundtrip_and_specials(tok):
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == MULTIBYTE
    assert tok.encode("<|im_start|>") == [1]  # a control token stays whole
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert tok.decode([1, 19556, 2], skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"
    assert tok.eos_token_ids == (2,) and tok.vocab_size == 49152


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(msgs[1:], add_generation_prompt=False)
    assert no_prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert not no_prompt.endswith("assistant\n")
    assert tok.encode_chat(msgs)[:3] == [1, 9690, 198]


def test_incremental_detokenizer_splits_multibyte_characters(tok):
    ids = tok.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE.split())  # some characters span several tokens
    det = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Say:"))
    pieces = [det.add([t]) for t in ids]
    assert "".join(pieces) + det.flush() == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=40), st.integers(1, 4))
def test_incremental_equals_full_decode(tok, text, step):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok)
    out = "".join(det.add(ids[i : i + step]) for i in range(0, len(ids), step)) + det.flush()
    assert out == tok.decode(ids)


def test_from_folder(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>"}, "chat_template": "X"}
        )
    )
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder_tok = Tokenizer.from_folder(tmp_path)
    assert folder_tok.encode(MULTIBYTE) == tok.encode(MULTIBYTE)
    assert folder_tok.eos_token_ids == (2, 0) and folder_tok.bos_token_id == 1
    assert folder_tok.apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"


def test_errors(tmp_path, tok):
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(UnsupportedModelError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    bare = Tokenizer(tok.backend)
    with pytest.raises(InvalidRequestError, match="chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    raising = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(InvalidRequestError, match="no system role"):
        raising.apply_chat_template([])
