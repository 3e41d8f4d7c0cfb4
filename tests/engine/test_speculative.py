"""Speculative decoding in the engine (tiny random-weight Llama): greedy output is token-identical to
decoding without it, for both proposers, k = 1, 3, 5 and each scheduler, with chunked prefill, prefix
reuse and suspension / preemption under memory pressure all on; both caches give every block back and the
draft cache never holds a request the main cache let go; suspend / resume restores both byte for byte."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import collect, make_engine, random_prompts, submit

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import RequestState, SamplingParams

MAX_TOKENS = 24
# 8-token blocks, 20 device blocks (~160 tokens: under two of these requests at once), a host tier,
# prefix reuse and 16-token chunks: prefill is chunked, prefixes are shared, requests are displaced.
PRESSURE = dict(
    tokens_per_block=8,
    num_device_blocks=20,
    num_host_blocks=64,
    enable_block_reuse=True,
    chunk_unit_size=16,
    max_num_tokens=48,
)
KINDS = ["unified", "two-stage", "recompute"]


def _prompts() -> list[list[int]]:
    shared = random_prompts([20], seed=9)[0]
    return random_prompts([40, 70, 25, 90], seed=1, prefix=shared)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict:
    """Greedy tokens without speculation, per scheduler (each must match its own baseline)."""
    refs = {}
    for kind in KINDS:
        ex = make_engine(tiny_llama_dir, scheduler=kind, **PRESSURE)
        submit(ex, _prompts(), MAX_TOKENS)
        refs[kind] = collect(ex)
    assert refs["unified"] == refs["two-stage"] == refs["recompute"]
    return refs


def _assert_nothing_held(ex) -> None:
    for kv in (ex.kv, ex.parts.draft_kv):
        if kv is None:
            continue
        check_invariants(kv)
        stats = kv.stats()
        assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("spec", ["ngram", "draft"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculation_is_token_identical_under_pressure(tiny_llama_dir, reference, kind, spec, k):
    extra = {"draft_num_layers": 1} if spec == "draft" else {}
    ex = make_engine(
        tiny_llama_dir, scheduler=kind, speculative=spec, num_speculative_tokens=k, **PRESSURE, **extra
    )
    submit(ex, _prompts(), MAX_TOKENS)
    assert collect(ex) == reference[kind]
    stats = ex.get_stats()
    assert stats.num_paused + stats.num_preempted > 0, "the pool is small enough to displace requests"
    assert stats.kv.reuse_hit_tokens_device + stats.kv.reuse_hit_tokens_host > 0
    assert stats.num_draft_tokens > 0 and stats.num_accepted_draft_tokens > 0
    _assert_nothing_held(ex)


@pytest.mark.parametrize("kind", KINDS)
def test_a_draft_equal_to_the_target_is_almost_always_accepted(tiny_llama_dir, reference, kind):
    """All target layers as the draft: the drafts are the target's own tokens, so nearly every one is
    kept and most steps produce k + 1 tokens, exercising the rewinds of long accepted runs."""
    ex = make_engine(
        tiny_llama_dir, scheduler=kind, speculative="draft", num_speculative_tokens=4, draft_num_layers=2,
        **PRESSURE,
    )  # fmt: skip
    ids = submit(ex, _prompts(), MAX_TOKENS)
    outs = {o.request_id: o for o in ex.run()}
    assert {rid: o.outputs[0].token_ids for rid, o in outs.items()} == reference[kind]
    m = outs[ids[0]].metrics
    assert m.acceptance_rate is not None and m.acceptance_rate > 0.9
    assert m.mean_accepted_tokens_per_step is not None and m.mean_accepted_tokens_per_step > 2.5
    assert ex.get_stats().acceptance_rate > 0.9
    _assert_nothing_held(ex)


def test_without_speculation_the_metrics_say_none(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir)
    submit(ex, _prompts()[:1], 4)
    (out,) = ex.run()
    assert out.metrics.acceptance_rate is None and out.metrics.mean_accepted_tokens_per_step is None


@pytest.mark.parametrize("kind", KINDS)
def test_the_draft_cache_never_outlives_the_main_one(tiny_llama_dir, kind):
    """After every step of a closed loop under pressure (aborts included), each request the draft
    cache holds is one the main cache holds."""
    ex = make_engine(
        tiny_llama_dir, scheduler=kind, speculative="draft", num_speculative_tokens=3, draft_num_layers=1,
        **PRESSURE,
    )  # fmt: skip
    ids = submit(ex, _prompts(), MAX_TOKENS)
    main, draft = ex.kv, ex.parts.draft_kv
    steps = 0
    while ex.has_unfinished_requests():
        ex.step()
        steps += 1
        if steps == 6:
            ex.abort_request(ids[1])
        for rid in range(len(ids)):
            if draft.has_request(rid):
                assert main.has_request(rid), f"step {steps}: draft holds request {rid}, main freed it"
        check_invariants(main)
        check_invariants(draft)
    _assert_nothing_held(ex)


def _blocks(storage, table: list[int], n_tokens: int, tpb: int) -> list[torch.Tensor]:
    nb = -(-n_tokens // tpb)
    return [layer[table[:nb]].clone() for layer in storage.device_kv]


def test_suspend_and_resume_restore_both_caches_byte_for_byte(tiny_llama_dir):
    ex = make_engine(
        tiny_llama_dir, speculative="draft", num_speculative_tokens=3, draft_num_layers=1, **PRESSURE
    )
    (rid,) = submit(ex, _prompts()[:1], MAX_TOKENS)
    req = ex._tracked[rid].req
    while req.state != RequestState.GENERATION_IN_PROGRESS or len(req.output_token_ids) < 6:
        ex.step()
    parts, tpb = ex.parts, ex.kv.tokens_per_block
    main, draft = ex.kv, parts.draft_kv
    n_main, n_draft = main.history(req), draft.history(req)
    assert n_draft > 0
    before = (
        _blocks(parts.storage, main.block_table(req), n_main, tpb),
        _blocks(parts.draft_storage, draft.block_table(req), n_draft, tpb),
    )
    main.suspend_request(req)
    draft.suspend_request(req)
    assert not main.is_request_active(rid) and not draft.is_request_active(rid)
    for storage in (parts.storage, parts.draft_storage):  # scribble over the device pools
        for layer in storage.device_kv:
            layer.fill_(7.0)
    assert main.try_allocate_generation(req) and draft.prepare_context(req)
    after = (
        _blocks(parts.storage, main.block_table(req), n_main, tpb),
        _blocks(parts.draft_storage, draft.block_table(req), n_draft, tpb),
    )
    for got, want in zip(after, before):
        for g, w in zip(got, want):
            # whole blocks come back; the partly written last block is compared over its history
            assert torch.equal(g[:-1], w[:-1])
    for got, want, n in zip(after, before, (n_main, n_draft)):
        used = n - (len(got[0]) - 1) * tpb
        for g, w in zip(got, want):
            assert torch.equal(g[-1][:, :used], w[-1][:, :used])


def test_speculative_options_are_checked():
    from kvsched.engine.engine_args import EngineArgs

    with pytest.raises(ConfigError, match="speculative"):
        EngineArgs(speculative="medusa")
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        EngineArgs(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="draft_num_layers"):
        EngineArgs(speculative="ngram", draft_num_layers=1)


def test_a_truncated_draft_deeper_than_the_target_is_a_config_error(tiny_llama_dir):
    with pytest.raises(ConfigError, match="draft_num_layers=3"):
        make_engine(tiny_llama_dir, speculative="draft", draft_num_layers=3)


def test_draft_kv_bytes_sizes_the_draft_pool(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir, speculative="draft", draft_num_layers=1, device_kv_bytes=1 << 20)
    shared = ex.parts.draft_kv.num_device_blocks
    assert shared == ex.kv.num_device_blocks  # one budget, split so both pools have the same blocks
    own = make_engine(
        tiny_llama_dir,
        speculative="draft",
        draft_num_layers=1,
        device_kv_bytes=1 << 20,
        draft_kv_bytes=1 << 19,
    )
    assert own.parts.draft_kv.num_device_blocks > shared and own.kv.num_device_blocks > shared


def test_sampling_with_speculation_runs_and_is_seeded(tiny_llama_dir):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=123)
    runs = []
    for _ in range(2):
        ex = make_engine(tiny_llama_dir, speculative="draft", num_speculative_tokens=3, draft_num_layers=1)
        ex.add_request(_prompts()[0], params)
        (out,) = ex.run()
        runs.append(out.outputs[0].token_ids)
        assert len(out.outputs[0].token_ids) == 12
    assert runs[0] == runs[1]


def test_stop_strings_cut_the_same_text_and_tokens(tiny_llama_dir):
    """A stop string met inside a step's accepted tokens ends the output there, as without drafts."""
    from kvsched import LLM

    prompt = {"prompt_token_ids": _prompts()[0]}
    plain = LLM(str(tiny_llama_dir), num_device_blocks=64)
    text = plain.generate(prompt, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    full = text.outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop])
    want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    spec = LLM(str(tiny_llama_dir), num_device_blocks=64, speculative="draft", draft_num_layers=2)
    got = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    assert len(got.token_ids) < 24


def test_the_offline_table_and_prometheus_report_acceptance(tiny_llama_dir):
    from kvsched import LLM
    from kvsched.bench.offline import run_offline
    from kvsched.serve.metrics import ServerMetrics

    llm = LLM(str(tiny_llama_dir), num_device_blocks=64, speculative="draft", draft_num_layers=2)
    chats = [[{"role": "user", "content": "say it again and again"}]] * 2
    report = run_offline(llm, num_prompts=2, max_tokens=8, use_tqdm=False, conversations=chats)
    assert report.spec_draft_tokens > 0 and 0.5 < report.acceptance_rate <= 1.0
    assert "Speculative acceptance" in report.table() and "Accepted drafts / step" in report.table()
    out = llm.generate({"prompt_token_ids": _prompts()[0]}, SamplingParams(max_tokens=8), use_tqdm=False)[0]
    metrics = ServerMetrics("tiny")
    metrics.observe_finished("length", out)
    body = metrics.render().decode()
    accepted = out.metrics.num_accepted_draft_tokens
    assert accepted > 0
    assert f'kvsched:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {float(accepted)}' in body
    assert "kvsched:spec_decode_num_draft_tokens_total" in body
