"""Async scheduling (engine/overlap.py): the same outputs with the overlap on and off — tokens, text,
finish reasons, logprobs — with suspensions, recompute, prefix reuse, stop strings, max_tokens ends and
aborts; no KV block left at the end; the forward really runs in the worker; the fallbacks."""

from __future__ import annotations

import threading
import time

import pytest
from engine_testlib import make_engine, random_prompts
from faults import faulty_engine, run_checked

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.types import Tier
from kvsched.core.request import SamplingParams
from kvsched.engine.engine_args import EngineArgs, add_engine_flags, engine_args_from_namespace

PROMPTS = random_prompts([10, 14, 20, 12, 18, 9, 30, 5], seed=3)

CONFIGS = {
    "roomy": {"tokens_per_block": 8, "num_device_blocks": 64},
    # 8 requests of up to 6 blocks in 14 device blocks: suspended to the host and resumed.
    "suspend": {
        "tokens_per_block": 8,
        "num_device_blocks": 14,
        "num_host_blocks": 64,
        "enable_block_reuse": False,
    },
    # No host tier: displaced requests lose their KV and prefill prompt + outputs again.
    "recompute": {"tokens_per_block": 8, "num_device_blocks": 14, "num_host_blocks": 0},
    # Prefix reuse from both tiers, chunked prefill, a small token budget.
    "reuse-chunked": {
        "tokens_per_block": 8,
        "num_device_blocks": 16,
        "num_host_blocks": 64,
        "chunk_unit_size": 8,
        "max_num_tokens": 24,
    },
    "two-stage": {"tokens_per_block": 8, "num_device_blocks": 14, "scheduler": "two-stage"},
}


class LetterTokenizer:
    """Token i decodes to one lowercase letter: text deltas and stop strings without a real vocabulary."""

    eos_token_ids = ()

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        return "".join(chr(97 + i % 26) for i in ids)


def _params(i: int) -> SamplingParams:
    """A mix: stop token ids, stop strings, logprobs, a seeded random request, max_tokens ends."""
    kinds = [
        {"stop_token_ids": [7, 100]},
        {"logprobs": 2},
        {"stop": ["ab", "xy", "q"]},
        {"temperature": 0.8, "seed": 11},
        {"stop": ["e"], "logprobs": 1},
        {},
    ]
    kw = {"max_tokens": 6 + 3 * i, "temperature": 0.0, **kinds[i % len(kinds)]}
    return SamplingParams(**kw)


def _drive(ex, prompts, abort_at=None, add_at=None) -> tuple[list, dict]:  # noqa: ANN001
    """Run to the end; abort request i once it has emitted ``abort_at[i]`` tokens; add ``add_at``'s
    prompts once the first request has emitted that many. Checks the KV invariants after every step."""
    abort_at = abort_at or {}
    ids = [ex.add_request(p, _params(i)) for i, p in enumerate(prompts)]
    seen = dict.fromkeys(ids, 0)
    deltas = dict.fromkeys(ids, "")
    results = {}
    pending_add = dict(add_at or {})
    while ex.has_unfinished_requests():
        for o in ex.step():
            seen[o.request_id] += len(o.new_token_ids)
            deltas[o.request_id] += o.text_delta
            if o.finished:
                results[o.request_id] = ex.pop_output(o.request_id)
        for i, n in abort_at.items():
            rid = ids[i]
            if rid not in results and seen[rid] >= n:
                ex.abort_request(rid)
                results[rid] = ex.pop_output(rid)
        for at, extra in list(pending_add.items()):
            if seen[ids[0]] >= at:
                del pending_add[at]
                for p in extra:
                    k = len(ids)
                    rid = ex.add_request(p, _params(k))
                    ids.append(rid)
                    seen[rid], deltas[rid] = 0, ""
        check_invariants(ex.kv)
    stats = ex.kv.stats()
    assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0
    summary = []
    for rid in ids:
        c = results[rid].outputs[0]
        assert c.text == deltas[rid] or c.finish_reason == "abort"
        summary.append((c.token_ids, c.text, c.finish_reason, c.logprobs, c.top_logprobs))
    st = ex.stats
    return summary, {
        "paused": st.num_paused,
        "preempted": st.num_preempted,
        "generated": st.num_generated_tokens,
        "context": st.num_context_tokens,
    }


def _same(over: list, sync: list) -> None:
    """Tokens, text and finish reasons exactly; logprobs to fp32 noise (a row's logits may differ in the
    last bits when the batch around it differs, as it does between two schedules)."""
    assert [s[:3] for s in over] == [s[:3] for s in sync]
    for o, s in zip(over, sync):
        assert (o[3] is None) == (s[3] is None) and (o[4] is None) == (s[4] is None)
        if s[3] is not None:
            assert o[3] == pytest.approx(s[3], abs=1e-5)
            for ot, st in zip(o[4], s[4]):
                assert ot.keys() == st.keys() and list(ot.values()) == pytest.approx(
                    list(st.values()), abs=1e-5
                )


def _engine(path, overlap: bool, **kw):  # noqa: ANN001
    ex = make_engine(path, async_scheduling=overlap, **kw)
    ex.parts.tokenizer = LetterTokenizer()
    return ex


@pytest.mark.parametrize("config", list(CONFIGS))
def test_outputs_identical_with_overlap_on_and_off(tiny_llama_dir, config):
    kw = CONFIGS[config]
    sync, sync_stats = _drive(_engine(tiny_llama_dir, False, **kw), PROMPTS)
    ex = _engine(tiny_llama_dir, True, **kw)
    assert ex._overlap is not None
    over, over_stats = _drive(ex, PROMPTS)
    _same(over, sync)
    assert over_stats["generated"] == sync_stats["generated"] == sum(len(s[0]) for s in sync)
    if config == "roomy":  # the same schedule: the same prefill tokens
        assert over_stats["context"] == sync_stats["context"] == sum(map(len, PROMPTS))
    reasons = {s[2] for s in sync}
    assert {"stop", "length"} <= reasons  # late stops and max_tokens ends both happened
    if config == "suspend":
        assert sync_stats["paused"] > 0 and over_stats["paused"] > 0
    if config == "recompute":
        assert sync_stats["preempted"] > 0 and over_stats["preempted"] > 0


@pytest.mark.parametrize("config", ["roomy", "suspend"])
def test_aborts_and_late_arrivals_give_the_same_outputs(tiny_llama_dir, config):
    kw = CONFIGS[config]
    abort_at = {1: 1, 3: 4, 6: 0 + 2}
    add_at = {3: random_prompts([11, 25], seed=5, prefix=PROMPTS[0][:8])}
    sync, _ = _drive(_engine(tiny_llama_dir, False, **kw), PROMPTS, abort_at, add_at)
    over, _ = _drive(_engine(tiny_llama_dir, True, **kw), PROMPTS, abort_at, add_at)
    _same(over, sync)
    assert [len(sync[i][0]) for i in abort_at] == list(abort_at.values())
    assert all(sync[i][2] == "abort" for i in abort_at)


def test_the_forward_runs_in_the_worker_while_the_engine_thread_returns(tiny_llama_dir):
    ex = _engine(tiny_llama_dir, True, **CONFIGS["roomy"])
    model = ex.parts.runner.model
    threads = []

    def recording(batch, storage):  # noqa: ANN001, ANN202
        threads.append(threading.current_thread().name)
        return model(batch, storage)

    ex.parts.runner.model = recording
    rid = ex.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
    assert ex.step() == []  # step 1 is submitted; its token comes with the next call
    assert ex._overlap._inflight is not None
    called_at = []  # monotonic time at each step() call that emitted a token
    while ex.has_unfinished_requests():
        t = time.monotonic()
        outs = ex.step()
        called_at += [t for o in outs for _ in o.new_token_ids]
    assert len(called_at) == 4
    assert threads and all(t.startswith("kvsched-forward") for t in threads)
    assert threading.current_thread().name not in threads
    # Token times are those of the tokens, not of the step updates applied before they were known.
    m = ex.pop_output(rid).metrics
    assert called_at[0] <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert called_at[-1] <= m.last_token_time


@pytest.mark.parametrize(
    "kw",
    [{"speculative": "ngram", "num_speculative_tokens": 2}, {"enable_lora": True}],
    ids=["speculative", "lora"],
)
def test_speculative_and_lora_engines_fall_back_to_the_synchronous_loop(tiny_llama_dir, kw):
    on = _engine(tiny_llama_dir, True, tokens_per_block=8, num_device_blocks=64, **kw)
    off = _engine(tiny_llama_dir, False, tokens_per_block=8, num_device_blocks=64, **kw)
    assert on._overlap is None
    assert _drive(on, PROMPTS[:4])[0] == _drive(off, PROMPTS[:4])[0]


def test_a_forward_fault_fails_the_requests_in_flight_and_the_engine_goes_on(tiny_llama_dir, hf_ref):
    ex = faulty_engine(
        tiny_llama_dir,
        model_fail_on={3},
        async_scheduling=True,
        max_batch_size=2,
        tokens_per_block=8,
        num_device_blocks=64,
    )
    prompts = random_prompts([5, 9, 7], seed=21)
    ids = [ex.add_request(p, SamplingParams(max_tokens=8, temperature=0.0)) for p in prompts]
    results = run_checked(ex)
    failed = [rid for rid in ids if results[rid].outputs[0].finish_reason == "error"]
    assert failed
    for rid, prompt in zip(ids, prompts):
        want = hf_ref.greedy(prompt, 8)
        got = results[rid].outputs[0].token_ids
        assert got == want if rid not in failed else got == want[: len(got)]
    more = random_prompts([6, 11], seed=22)
    again = [ex.add_request(p, SamplingParams(max_tokens=8, temperature=0.0)) for p in more]
    results = run_checked(ex)
    assert [results[rid].outputs[0].token_ids for rid in again] == [hf_ref.greedy(p, 8) for p in more]


def test_async_scheduling_flag():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_args_from_namespace(parser.parse_args(["--async-scheduling"])).async_scheduling is True
    assert EngineArgs().async_scheduling is False
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineArgs(async_scheduling="yes")


@pytest.mark.parametrize(
    "src, dst", [(Tier.DEVICE, Tier.HOST), (Tier.HOST, Tier.DEVICE)], ids=["suspend", "resume"]
)
def test_a_failed_kv_copy_fails_the_request_being_moved_only(tiny_llama_dir, hf_ref, src, dst):
    kw = {"tokens_per_block": 8, "num_device_blocks": 14, "enable_block_reuse": False}
    ex = faulty_engine(
        tiny_llama_dir, storage_fault=(src, dst), num_host_blocks=64, async_scheduling=True, **kw
    )
    prompts = random_prompts([10, 14, 20, 12, 18, 9], seed=3)
    ids = [ex.add_request(p, SamplingParams(max_tokens=28, temperature=0.0)) for p in prompts]
    results = run_checked(ex)
    assert ex.kv._store.storage.failed == 1
    failed = [rid for rid in ids if results[rid].outputs[0].finish_reason == "error"]
    assert len(failed) == 1 and "injected copy fault" in results[failed[0]].error
    for rid, prompt in zip(ids, prompts):
        want = hf_ref.greedy(prompt, 28)
        got = results[rid].outputs[0].token_ids
        assert got == want if rid not in failed else got == want[: len(got)]
    assert ex.kv.stats().num_suspends > 1


def test_a_stop_token_on_the_last_allowed_token_names_stop(tiny_llama_dir):
    """The max_tokens end is applied at submission, the token only known later: a stop token id in that
    last place still makes the reason "stop", as in the synchronous loop."""
    prompt = PROMPTS[2]
    ref = _engine(tiny_llama_dir, False, **CONFIGS["roomy"])
    ref.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0))
    tokens = ref.run()[0].outputs[0].token_ids
    k = tokens.index(tokens[5])  # the first place that token appears
    params = SamplingParams(max_tokens=k + 1, temperature=0.0, stop_token_ids=[tokens[k]])
    outs = []
    for overlap in (False, True):
        ex = _engine(tiny_llama_dir, overlap, **CONFIGS["roomy"])
        ex.add_request(prompt, params)
        [out] = ex.run()
        outs.append((out.outputs[0].token_ids, out.outputs[0].finish_reason))
    assert outs[0] == outs[1] == (tokens[: k + 1], "stop")


def test_llm_generate_with_async_scheduling_keyword(tiny_llama_dir):
    from kvsched import LLM

    prompts = ["the cat sat on", "one two three", "hello"]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=["q"], logprobs=1)
    outs = []
    for overlap in (False, True):
        llm = LLM(str(tiny_llama_dir), async_scheduling=overlap, num_device_blocks=64, tokens_per_block=8)
        assert (llm.engine._overlap is not None) == overlap
        got = llm.generate(prompts, params, use_tqdm=False)
        outs.append([(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in got])
    assert outs[0] == outs[1]
