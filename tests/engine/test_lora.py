"""Multi-LoRA serving against HF transformers + peft on the tiny checkpoint.

Adapters are made with peft inside the tests (random non-zero A and B, so every adapted module changes
the logits), saved in the HF PEFT format, loaded by the engine by name, and served in mixed batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_testlib import GREEDY, make_engine, random_prompts

from kvsched.core.errors import InvalidRequestError, RequestTooLargeError, UnsupportedFeatureError
from kvsched.core.request import SamplingParams
from kvsched.engine.lora import LoraAdapterError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

#: name -> (rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "attn": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "mlp": (8, 16, ["gate_proj", "up_proj", "down_proj", "o_proj"], True),
}


def _base(path: Path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _make_adapter(base_dir: Path, out: Path, rank: int, alpha: int, targets: list[str], rs: bool, seed: int):
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rs, lora_dropout=0.0)
    model = peft.get_peft_model(_base(base_dir), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {
        name: _make_adapter(tiny_llama_dir, root / name, r, a, t, rs, seed=i)
        for i, (name, (r, a, t, rs)) in enumerate(ADAPTERS.items())
    }


class PeftReference:
    """Greedy continuations from HF generate with each adapter (None = the base model), memoised."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path]) -> None:
        self.models = {None: _base(base_dir)}
        for name, path in adapters.items():
            self.models[name] = peft.PeftModel.from_pretrained(_base(base_dir), path).eval()
        self._memo: dict = {}

    def greedy(self, adapter: str | None, prompt: list[int], n: int) -> list[int]:
        key = (adapter, tuple(prompt), n)
        if key not in self._memo:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.models[adapter].generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            self._memo[key] = out[0, len(prompt) :].tolist()
        return self._memo[key]


@pytest.fixture(scope="module")
def peft_ref(tiny_llama_dir, adapter_dirs) -> PeftReference:
    return PeftReference(tiny_llama_dir, adapter_dirs)


def _lora_engine(tiny_llama_dir, adapter_dirs, **kwargs):
    mods = {name: str(p) for name, p in adapter_dirs.items()}
    return make_engine(tiny_llama_dir, lora_modules=mods, **kwargs)


def _serve(ex, jobs, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=GREEDY)
    ids = [ex.add_request(p, params, lora_id=lora) for lora, p in jobs]
    got = {o.request_id: o for o in ex.run()}
    return [got[i] for i in ids]


def test_adapters_change_the_output(peft_ref):
    prompt = random_prompts([12], seed=20)[0]
    outs = {a: peft_ref.greedy(a, prompt, 12) for a in (None, "attn", "mlp")}
    assert len({tuple(v) for v in outs.values()}) == 3  # otherwise equality below proves nothing


@pytest.mark.parametrize("scheduler", ["unified", "recompute", "two-stage"])
def test_mixed_batch_chunked_and_suspended_matches_peft(tiny_llama_dir, adapter_dirs, peft_ref, scheduler):
    ex = _lora_engine(
        tiny_llama_dir,
        adapter_dirs,
        scheduler=scheduler,
        tokens_per_block=8,
        num_device_blocks=14,
        num_host_blocks=64,
        chunk_unit_size=8,
        max_num_tokens=24,
    )
    prompts = random_prompts([10, 30, 20, 12, 18, 9], seed=21)
    loras = ["attn", None, "mlp", "mlp", "attn", None]
    outs = _serve(ex, list(zip(loras, prompts)), max_tokens=20)
    for lora, prompt, out in zip(loras, prompts, outs):
        assert out.outputs[0].token_ids == peft_ref.greedy(lora, prompt, 20), (lora, len(prompt))
    stats = ex.kv.stats()
    assert ex.stats.num_steps > 30 // 24
    if scheduler == "unified":
        assert stats.num_suspends > 0 and stats.num_resumes > 0
    assert ex.parts.peft_cache.pinned_pages == 0  # finished requests released their adapters
    assert ex.parts.runner.lora.num_evictions == 0  # the default budget holds every adapter


def test_cached_kv_is_never_shared_across_adapters(tiny_llama_dir, adapter_dirs, peft_ref):
    ex = _lora_engine(tiny_llama_dir, adapter_dirs, tokens_per_block=8, num_device_blocks=64)
    prompt = random_prompts([40], seed=22)[0]
    hits = []
    for lora in ("attn", "mlp", None, "attn"):
        before = ex.kv.stats().reuse_hit_tokens_device
        (out,) = _serve(ex, [(lora, prompt)], max_tokens=6)
        assert out.outputs[0].token_ids == peft_ref.greedy(lora, prompt, 6), lora
        hits.append(ex.kv.stats().reuse_hit_tokens_device - before)
    assert hits[:3] == [0, 0, 0]  # same prompt, another adapter (or none): nothing reused
    assert hits[3] >= 32  # the same adapter again reuses its own blocks


def test_page_budget_holds_with_more_adapters_than_pages(tiny_llama_dir, adapter_dirs, peft_ref):
    ex = _lora_engine(tiny_llama_dir, adapter_dirs, tokens_per_block=8, num_device_blocks=64)
    reg = ex.parts.lora
    budget = max(reg.pages(i) for i in reg.adapters)  # one adapter at a time
    ex = _lora_engine(
        tiny_llama_dir, adapter_dirs, tokens_per_block=8, num_device_blocks=64, max_lora_pages=budget
    )
    peft_cache, residency = ex.parts.peft_cache, ex.parts.runner.lora
    prompts = random_prompts([9, 14, 7, 11, 5, 16], seed=23)
    loras = ["attn", "mlp", None, "mlp", "attn", "attn"]
    params = SamplingParams(max_tokens=8, temperature=GREEDY)
    ids = [ex.add_request(p, params, lora_id=lora) for lora, p in zip(loras, prompts)]
    done = {}
    steps = 0
    while ex.has_unfinished_requests():
        for o in ex.step():
            if o.finished:
                done[o.request_id] = ex.pop_output(o.request_id)
        assert peft_cache.pinned_pages <= budget
        assert residency.resident_pages <= budget  # the device tier never holds more than the budget
        steps += 1
    for rid, lora, prompt in zip(ids, loras, prompts):
        assert done[rid].outputs[0].token_ids == peft_ref.greedy(lora, prompt, 8)
    assert steps > 8  # the two adapters could not run side by side
    assert residency.num_evictions >= 1 and residency.num_loads == residency.num_evictions + 1


def test_llm_generate_lora_request(tiny_llama_dir, adapter_dirs, peft_ref):
    from kvsched.engine.llm import LLM

    llm = LLM(
        str(tiny_llama_dir),
        lora_modules={n: str(p) for n, p in adapter_dirs.items()},
        tokens_per_block=8,
        num_device_blocks=64,
    )
    prompts = random_prompts([6, 9, 13], seed=24)
    loras = ["mlp", None, "attn"]
    sp = SamplingParams(max_tokens=5, temperature=GREEDY)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False, lora_request=loras)
    for lora, p, out in zip(loras, prompts, outs):
        assert out.outputs[0].token_ids == peft_ref.greedy(lora, p, 5)
    (one,) = llm.generate({"prompt_token_ids": prompts[0]}, sp, use_tqdm=False, lora_request="attn")
    assert one.outputs[0].token_ids == peft_ref.greedy("attn", prompts[0], 5)
    with pytest.raises(InvalidRequestError, match="2 lora_request entries for 3 prompts"):
        llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=["mlp", None])


def test_request_errors(tiny_llama_dir, adapter_dirs):
    ex = _lora_engine(tiny_llama_dir, adapter_dirs, tokens_per_block=8, num_device_blocks=64)
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'nope'"):
        ex.add_request([1, 2, 3], lora_id="nope")
    with pytest.raises(InvalidRequestError, match="lora_id=7 is not a loaded"):
        ex.add_request([1, 2, 3], lora_id=7)
    assert ex.add_request([1, 2, 3], lora_id=ex.lora_names["mlp"]) is not None
    base = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64)
    with pytest.raises(UnsupportedFeatureError, match="no LoRA adapters loaded"):
        base.add_request([1, 2, 3], lora_id=1)
    small = _lora_engine(
        tiny_llama_dir, adapter_dirs, num_device_blocks=64, max_lora_pages=1, lora_page_bytes=1024
    )
    with pytest.raises(
        RequestTooLargeError, match="LoRA adapter 'mlp' needs .* pages, the device budget is 1"
    ):
        small.add_request([1, 2, 3], lora_id="mlp")


def _copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_load_errors(tiny_llama_dir, adapter_dirs, tmp_path):
    src = adapter_dirs["attn"]
    cases = {
        "missing": (tmp_path / "missing", "is not a directory"),
        "rank": (_copy_adapter(src, tmp_path / "rank", r=5), r"rank 5 on the base model needs A \(5, 64\)"),
        "target": (
            _copy_adapter(src, tmp_path / "target", target_modules=["q_proj", "lm_head"]),
            "target module 'lm_head' is unsupported",
        ),
        "dora": (_copy_adapter(src, tmp_path / "dora", use_dora=True), "use_dora=True is unsupported"),
    }
    no_weights = _copy_adapter(src, tmp_path / "noweights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases["weights"] = (no_weights, "adapter_model.safetensors is missing")
    no_cfg = _copy_adapter(src, tmp_path / "nocfg")
    (no_cfg / "adapter_config.json").unlink()
    cases["config"] = (no_cfg, "adapter_config.json is missing")
    for name, (path, message) in cases.items():
        with pytest.raises(LoraAdapterError, match=message):
            make_engine(tiny_llama_dir, num_device_blocks=16, lora_modules={name: str(path)})


def test_no_adapters_means_no_lora_layers(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir, num_device_blocks=16)
    from kvsched.engine.lora import LoraLinear

    assert ex.parts.peft_cache is None and ex.parts.model.lora_context is None
    assert not any(isinstance(m, LoraLinear) for m in ex.parts.model.modules())


def test_lora_modules_flag():
    import argparse

    from kvsched.engine.engine_args import add_engine_flags, engine_args_from_namespace

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    ns = parser.parse_args(["--lora-modules", "a=dir/a", "b=dir/b", "--max-lora-pages", "3"])
    args = engine_args_from_namespace(ns)
    assert args.lora_modules == {"a": "dir/a", "b": "dir/b"} and args.max_lora_pages == 3
    assert engine_args_from_namespace(parser.parse_args([])).lora_modules is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-modules", "no-path"])


def test_lora_engine_args_errors():
    from kvsched.core.errors import ConfigError
    from kvsched.engine.engine_args import EngineArgs

    with pytest.raises(ConfigError, match="speculative decoding is not supported"):
        EngineArgs(speculative="ngram", lora_modules={"a": "dir/a"})
    with pytest.raises(ConfigError, match="max_lora_pages=-1 is invalid"):
        EngineArgs(max_lora_pages=-1)
    with pytest.raises(ConfigError, match="lora_modules=.* must be a mapping"):
        EngineArgs(lora_modules=["dir/a"])


def test_residency_never_evicts_a_pinned_adapter(tiny_llama_dir, adapter_dirs):
    from kvsched.core.errors import KVSchedError
    from kvsched.core.request import Request

    probe = _lora_engine(tiny_llama_dir, adapter_dirs, num_device_blocks=16).parts.lora
    budget = max(probe.pages(i) for i in probe.adapters)
    parts = _lora_engine(tiny_llama_dir, adapter_dirs, num_device_blocks=16, max_lora_pages=budget).parts
    res, peft_cache = parts.runner.lora, parts.peft_cache
    attn, mlp = parts.lora.ids["attn"], parts.lora.ids["mlp"]
    holder = Request(0, [1, 2], 1, lora_id=attn)
    res.prepare([attn])
    peft_cache.acquire(holder)
    with pytest.raises(KVSchedError, match="need more than max_device_pages"):
        res.prepare([mlp])  # the only room is held by a pinned adapter
    assert list(res.resident) == [attn] and res.num_evictions == 0
    attn_keys = parts.lora.adapters[attn].weights.keys()
    assert all(attn in res.layers[k].deltas for k in attn_keys)
    peft_cache.release(holder)
    res.prepare([mlp])  # unpinned now: evicted least-recently-used
    assert list(res.resident) == [mlp] and res.num_evictions == 1
    assert not any(attn in w.deltas for w in res.layers.values())
