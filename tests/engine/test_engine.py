"""The engine's request API: bad input fails alone, abort frees KV at once, seeds, stops, metrics."""

from __future__ import annotations

import pytest
from engine_testlib import make_engine, random_prompts

from kvsched.core.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    RequestTooLargeError,
    UnknownRequestError,
    UnsupportedFeatureError,
)
from kvsched.core.request import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


class LetterTokenizer:
    """Token i decodes to one lowercase letter: enough to exercise text deltas and stop strings."""

    eos_token_ids = ()

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_bad_inputs_fail_alone_while_others_finish(tiny_llama_dir, hf_ref):
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64, max_model_len=200)
    prompts = random_prompts([5, 23, 40], seed=21)
    ids = [ex.add_request(p, GREEDY, request_id=f"good-{i}") for i, p in enumerate(prompts)]
    ex.step()
    ex.step()
    with pytest.raises(InvalidRequestError, match="empty"):
        ex.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="max_model_len=200"):
        ex.add_request([1] * 195, GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        ex.add_request([1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="token ids"):
        ex.add_request([1, 999], GREEDY)
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        ex.add_request("text needs a tokenizer", GREEDY)
    with pytest.raises(UnknownRequestError):
        ex.abort_request("never-added")
    with pytest.raises(DuplicateRequestError):
        ex.add_request([3, 4], GREEDY, request_id="good-1")
    with pytest.raises(UnsupportedFeatureError, match="LoRA"):
        ex.add_request([3, 4], GREEDY, lora_id=1)
    one = SamplingParams(max_tokens=1)
    taken = {ex.add_request([3, 4], one, request_id=k) for k in range(30)}  # the next automatic ids
    auto = [ex.add_request([3, 4], one) for _ in range(3)]
    assert not taken & set(auto) and len(set(auto)) == 3
    got = {o.request_id: o.outputs[0].token_ids for o in ex.run()}
    assert [got[i] for i in ids] == [hf_ref.greedy(p, 12) for p in prompts]
    assert len(got) == len(ids) + 33


def test_request_larger_than_the_device_pool_is_rejected(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=4, num_host_blocks=64)
    with pytest.raises(RequestTooLargeError, match="4"):
        ex.add_request([1] * 30, SamplingParams(max_tokens=8))


def test_abort_frees_kv_at_once_and_the_rest_continue(tiny_llama_dir, hf_ref):
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64, enable_block_reuse=False)
    keep, drop = random_prompts([9, 60], seed=22)
    kid = ex.add_request(keep, GREEDY)
    did = ex.add_request(drop, GREEDY)
    ex.step()
    free_before = ex.kv.num_free_device_blocks
    ex.abort_request(did)
    assert ex.kv.num_free_device_blocks >= free_before + 60 // 8
    aborted = ex.pop_output(did)
    assert aborted.outputs[0].finish_reason == "abort"
    with pytest.raises(UnknownRequestError):
        ex.abort_request(did)
    done = ex.run()
    assert [o.request_id for o in done] == [kid]
    assert done[0].outputs[0].token_ids == hf_ref.greedy(keep, 12)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_llama_dir):
    prompt = random_prompts([12], seed=23)[0]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    alone = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64)
    alone.add_request(prompt, params)
    [a] = alone.run()
    crowd = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64, seed=99)
    for other in random_prompts([7, 30], seed=24):
        crowd.add_request(other, SamplingParams(max_tokens=16, temperature=1.0))
    rid = crowd.add_request(prompt, params)
    b = next(o for o in crowd.run() if o.request_id == rid)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    greedy = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64)
    greedy.add_request(prompt, SamplingParams(max_tokens=16, temperature=0.0))
    assert greedy.run()[0].outputs[0].token_ids != a.outputs[0].token_ids


def test_stop_token_and_stop_string(tiny_llama_dir, hf_ref):
    prompt = random_prompts([15], seed=25)[0]
    ref = hf_ref.greedy(prompt, 12)
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64)
    ex.parts.tokenizer = LetterTokenizer()
    ex.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[ref[3]]))
    [out] = ex.run()
    first = ref.index(ref[3])
    assert out.outputs[0].token_ids == ref[: first + 1] and out.outputs[0].finish_reason == "stop"
    letters = LetterTokenizer().decode(ref)
    stop = letters[5:7]
    rid = ex.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))
    deltas = []
    while ex.has_unfinished_requests():
        deltas += [o.text_delta for o in ex.step()]
    out = ex.pop_output(rid)
    cut = letters.index(stop)
    assert out.outputs[0].text == letters[:cut] == "".join(deltas)
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) <= 7
    # the stop string completes on the last allowed token: it cuts the text, so it names the reason
    ex.add_request(prompt, SamplingParams(max_tokens=cut + 2, temperature=0.0, stop=[stop]))
    [out] = ex.run()
    assert len(out.outputs[0].token_ids) == cut + 2 and out.outputs[0].text == letters[:cut]
    assert out.outputs[0].finish_reason == "stop"


def test_metrics_and_logprobs(tiny_llama_dir):
    system = random_prompts([32], seed=26)[0]
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=12, num_host_blocks=64)
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=1)
    ex.add_request(random_prompts([3], seed=27, prefix=system)[0], params)
    ex.run()
    for p in random_prompts([4, 6, 5], seed=28, prefix=system):
        ex.add_request(p, params)
    outs = ex.run()
    for o in outs:
        m = o.metrics
        assert m.num_generation_tokens == len(o.outputs[0].token_ids) == 20
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time < m.last_token_time <= m.finished_time
        assert m.ttft == m.first_token_time - m.arrival_time > 0
        assert m.tpot == (m.last_token_time - m.first_token_time) / 19 > 0
        assert m.num_reused_tokens == 32 and o.num_cached_tokens == 32
        lps = o.outputs[0].logprobs
        assert len(lps) == 20 and all(lp <= 0 for lp in lps)
    stats = ex.kv.stats()
    assert sum(o.metrics.num_suspends for o in outs) == stats.num_suspends > 0
    assert sum(o.metrics.num_resumes for o in outs) == stats.num_resumes
    assert ex.stats.num_finished == 4 and ex.stats.finish_reasons == {"length": 4}
    engine = ex.get_stats()
    assert engine.kv.num_suspends == stats.num_suspends and engine.kv.reuse_hit_tokens >= 3 * 32
    assert 0 < engine.peak_device_usage <= 1 and engine.peak_host_blocks_used > 0
    assert engine.num_generated_tokens == 4 * 20 and engine.num_steps > 20


def _finish_steps(ex, arrivals: dict[int, tuple]) -> dict:
    """Step the engine to the end; ``arrivals[step]`` = add_request arguments submitted before that step.
    Returns request id -> the step index it finished in."""
    finished, step = {}, 0
    while ex.has_unfinished_requests() or any(s > step for s in arrivals):
        step += 1
        if step in arrivals:
            *args, kw = arrivals[step]
            ex.add_request(*args, **kw)
        for o in ex.step():
            if o.finished:
                finished[o.request_id] = step
    return finished


@pytest.mark.parametrize("priority_mode", [False, True])
def test_high_priority_request_arriving_late_overtakes_under_memory_pressure(tiny_llama_dir, priority_mode):
    """Six priority-0 requests start (two per batch, a device pool too small for two whole requests);
    a priority-5 request arrives at step 4. In priority mode it takes the slot of the request the KV
    pressure suspends and is never a victim itself, so it finishes before every earlier request."""
    ex = make_engine(
        tiny_llama_dir,
        tokens_per_block=4,
        num_device_blocks=10,
        num_host_blocks=64,
        max_batch_size=2,
        priority_mode=priority_mode,
    )
    prompts = random_prompts([12] * 7, seed=1)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    low = [ex.add_request(p, params, request_id=f"low-{i}") for i, p in enumerate(prompts[:6])]
    done = _finish_steps(ex, {4: (prompts[6], params, {"request_id": "high", "priority": 5})})
    order = sorted(done, key=done.get)
    assert len(set(done.values())) == 7  # one finish per step: the order is strict
    assert order == (["high", *low] if priority_mode else [*low, "high"])
    assert ex.stats.num_paused > 0


def test_priority_must_be_an_integer(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=16)
    for bad in ("1", 2.0, None, True):
        with pytest.raises(InvalidRequestError, match="priority=.* is invalid: must be an integer"):
            ex.add_request([1, 2, 3], GREEDY, priority=bad)
    assert not ex.has_unfinished_requests() and ex.kv.stats().num_requests == 0


def test_kv_events_of_a_prefix_reuse_run(tiny_llama_dir):
    """Stored events carry the chained SHA-256 of each full block (what a router computes from the
    tokens); a second request on the same prefix reuses those blocks and stores only its own."""
    from kvsched.core.kvcache.keys import block_key, root_key

    seen: list = []
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=32)
    ex.on_kv_events = seen.append
    prefix = random_prompts([24], seed=3)[0]  # three full blocks
    first, second = prefix + [7, 8, 9, 10], prefix + [11, 12, 13, 14, 15, 16, 17, 18, 19]
    ex.add_request(first, SamplingParams(max_tokens=2, temperature=0.0), request_id="a")
    ex.run()
    assert seen and all(batch for batch in seen)  # called after steps, never with an empty list
    stored = [e for batch in seen for e in batch if e.kind == "stored"]
    keys, parent = [], root_key(None, None)
    for b in range(3):
        parent = block_key(parent, prefix[b * 8 : (b + 1) * 8])
        keys.append(parent)
    assert [e.block_hash for e in stored] == keys
    assert [e.parent_hash for e in stored] == [None, keys[0], keys[1]]
    assert all(e.tier == 0 for e in stored)
    assert ex.drain_kv_events() == []  # the callback took them all

    ex.on_kv_events = None  # now poll instead
    ex.add_request(second, SamplingParams(max_tokens=1, temperature=0.0), request_id="b")
    ex.run()
    events = ex.drain_kv_events()
    assert ex.drain_kv_events() == []
    assert [e.kind for e in events] == ["stored"]  # only the fourth block is new
    own = block_key(keys[-1], second[24:32])
    assert events[0].block_hash == own and events[0].parent_hash == keys[-1]


def test_the_old_name_executor_is_an_alias_of_engine():
    import kvsched.engine
    from kvsched.engine.engine import Engine
    from kvsched.engine.parts import EngineParts, build_engine_parts

    assert kvsched.engine.Executor is Engine and kvsched.engine.Engine is Engine
    assert kvsched.engine.EngineParts is EngineParts
    assert kvsched.engine.build_engine_parts is build_engine_parts
    with pytest.raises(AttributeError, match="has no attribute 'EngineCore'"):
        _ = kvsched.engine.EngineCore
