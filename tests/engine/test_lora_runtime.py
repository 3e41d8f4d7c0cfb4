"""LoRA adapters loaded and unloaded while the engine runs (Engine.load_lora_adapter / unload_lora_adapter).

An adapter loaded at runtime must serve exactly the tokens of an engine started with it (and of
HF transformers + peft); an unloaded one is gone, its id never reused; every refusal is a typed error.
"""

from __future__ import annotations

import pytest
from engine_testlib import GREEDY, make_engine, random_prompts
from test_lora import adapter_dirs, peft_ref  # noqa: F401 - module-scoped fixtures (adapters made with peft)

from kvsched.core.errors import InvalidRequestError, RequestTooLargeError, UnsupportedFeatureError
from kvsched.core.peft import AdapterInUseError, AdapterNotFoundError
from kvsched.core.request import SamplingParams
from kvsched.engine.lora import LoraAdapterError, LoraLinear

pytest.importorskip("peft")


def _run(ex, jobs, n=8):
    params = SamplingParams(max_tokens=n, temperature=GREEDY)
    ids = [ex.add_request(p, params, lora_id=lora) for lora, p in jobs]
    got = {o.request_id: o.outputs[0].token_ids for o in ex.run()}
    return [got[i] for i in ids]


def test_runtime_load_serves_like_a_startup_adapter(tiny_llama_dir, adapter_dirs, peft_ref):  # noqa: F811
    prompts = random_prompts([9, 14, 6], seed=31)
    jobs = [("attn", prompts[0]), (None, prompts[1]), ("mlp", prompts[2]), ("attn", prompts[1])]
    started = make_engine(
        tiny_llama_dir, num_device_blocks=32, lora_modules={k: str(v) for k, v in adapter_dirs.items()}
    )
    want = _run(started, jobs)
    ex = make_engine(tiny_llama_dir, num_device_blocks=32, enable_lora=True)
    assert ex.lora_names == {} and not any(isinstance(m, LoraLinear) for m in ex.parts.model.modules())
    assert _run(ex, [(None, prompts[1])]) == [want[1]]
    assert ex.load_lora_adapter("attn", adapter_dirs["attn"]) == 1
    assert ex.load_lora_adapter("mlp", str(adapter_dirs["mlp"])) == 2
    assert ex.lora_names == {"attn": 1, "mlp": 2}
    assert _run(ex, jobs) == want
    assert want[0] == peft_ref.greedy("attn", prompts[0], 8)
    assert want[2] == peft_ref.greedy("mlp", prompts[2], 8)
    # unload: the name is gone, a reload gets a fresh id (prefix-cache keys of the old one never match)
    assert ex.unload_lora_adapter("attn") == 1
    assert ex.lora_names == {"mlp": 2}
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'attn'"):
        ex.add_request(prompts[0], SamplingParams(max_tokens=2), lora_id="attn")
    assert ex.load_lora_adapter("attn", adapter_dirs["attn"]) == 3
    assert _run(ex, jobs) == want


def test_unload_refuses_while_a_request_uses_the_adapter(tiny_llama_dir, adapter_dirs):  # noqa: F811
    ex = make_engine(tiny_llama_dir, num_device_blocks=32, enable_lora=True)
    ex.load_lora_adapter("attn", adapter_dirs["attn"])
    ex.load_lora_adapter("mlp", adapter_dirs["mlp"])
    ex.add_request(
        random_prompts([8], seed=3)[0], SamplingParams(max_tokens=4, temperature=GREEDY), lora_id="attn"
    )
    ex.step()
    with pytest.raises(AdapterInUseError, match="'attn' is in use by 1 unfinished request"):
        ex.unload_lora_adapter("attn")
    ex.unload_lora_adapter("mlp")  # an idle adapter goes at once
    ex.run()
    assert ex.parts.peft_cache is not None and not ex.parts.peft_cache.is_pinned(1)
    ex.unload_lora_adapter("attn")
    assert ex.lora_names == {} and ex.parts.runner.lora is not None and ex.parts.runner.lora.resident == {}
    # without max_lora_pages the budget follows the loaded adapters: none left, no pages
    assert ex.parts.peft_cache.max_device_pages == 0


def test_runtime_errors(tiny_llama_dir, adapter_dirs, tmp_path):  # noqa: F811
    ex = make_engine(
        tiny_llama_dir, num_device_blocks=16, enable_lora=True, max_lora_pages=1, lora_page_bytes=64
    )
    with pytest.raises(RequestTooLargeError, match=r"'attn' needs \d+ pages, the device budget is 1"):
        ex.load_lora_adapter("attn", adapter_dirs["attn"])
    assert ex.lora_names == {}
    ex = make_engine(tiny_llama_dir, num_device_blocks=16, enable_lora=True)
    with pytest.raises(AdapterNotFoundError, match="is not a directory"):
        ex.load_lora_adapter("x", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraAdapterError, match="missing"):
        ex.load_lora_adapter("x", tmp_path / "empty")
    ex.load_lora_adapter("attn", adapter_dirs["attn"])
    with pytest.raises(InvalidRequestError, match="'attn' is already loaded"):
        ex.load_lora_adapter("attn", adapter_dirs["mlp"])
    with pytest.raises(InvalidRequestError, match="lora_name=''"):
        ex.load_lora_adapter("", adapter_dirs["mlp"])
    with pytest.raises(AdapterNotFoundError, match="'nope' is not loaded"):
        ex.unload_lora_adapter("nope")
    assert ex.lora_names == {"attn": 1}
    plain = make_engine(tiny_llama_dir, num_device_blocks=16)
    with pytest.raises(UnsupportedFeatureError, match="enable_lora=True"):
        plain.load_lora_adapter("attn", adapter_dirs["attn"])
