"""Property test of the unified pass on random request mixes, against the invariants of TensorRT-LLM
PR #11939's KVCacheV2Scheduler: a request in at most one list, in-flight ids never scheduled, token /
batch / PEFT budgets kept, every scheduled request holds the KV of its step, paused ones hold none."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sched_fakes import FakeKV, FakePeft, _Cache, ctx

from hypothesis_budget import mutation_budget
from kvsched.core.errors import InvalidRequestError, SchedulerDeadlockError
from kvsched.core.request import RequestState
from kvsched.core.scheduler import UnifiedScheduler
from kvsched.core.scheduler.common import lora_key

req_spec = st.tuples(
    st.sampled_from(["fresh", "started", "gen", "gen-suspended", "done"]),
    st.integers(1, 40),  # prompt length
    st.integers(0, 2),  # draft tokens
    st.sampled_from([None, None, 1, 2, 3]),  # LoRA adapter
)


def build(kv: FakeKV, k: int, spec):
    kind, prompt, drafts, lora = spec
    r = ctx(k, prompt=prompt, lora_id=lora)
    if kind == "started" and prompt > 1:
        r.context_current_position = prompt // 2
        kv.caches[k] = _Cache(capacity=prompt // 2, history=prompt // 2)
    elif kind.startswith("gen") or kind == "done":
        r.context_current_position = prompt
        r.output_token_ids = [3]
        r.state = RequestState.GENERATION_COMPLETE if kind == "done" else RequestState.GENERATION_IN_PROGRESS
        r.draft_tokens = [0] * drafts
        kv.caches[k] = _Cache(capacity=prompt, history=prompt, active=kind != "gen-suspended")
    return r


@settings(max_examples=mutation_budget(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(req_spec, max_size=14),
    device=st.integers(4, 60),
    max_tokens=st.one_of(st.none(), st.integers(1, 64)),
    batch=st.integers(1, 16),
    unit=st.one_of(st.none(), st.integers(1, 8)),
    pages=st.one_of(st.none(), st.integers(0, 6)),
    inflight_mask=st.integers(0, 2**14 - 1),
)
def test_unified_pass_invariants(specs, device, max_tokens, batch, unit, pages, inflight_mask):
    kv = FakeKV(num_device_blocks=10_000)
    reqs = [build(kv, k, s) for k, s in enumerate(specs)]
    kv.num_device_blocks = max(device, kv.used_device_blocks)
    peft = None if pages is None else FakePeft(max_device_pages=pages, pages={1: 1, 2: 2, 3: 3})
    inflight = {k for k in range(len(reqs)) if inflight_mask >> k & 1}
    sched = UnifiedScheduler(
        kv, max_batch_size=batch, max_num_tokens=max_tokens, chunk_unit_size=unit, peft_cache=peft
    )
    try:
        out = sched.schedule(reqs, inflight_request_ids=inflight)
    except (SchedulerDeadlockError, InvalidRequestError):
        return
    ctx_ids = [r.request_id for r in out.context_requests]
    gen_ids = [r.request_id for r in out.generation_requests]
    paused_ids = [r.request_id for r in out.paused_requests]
    everything = ctx_ids + gen_ids + paused_ids
    assert len(everything) == len(set(everything))
    assert not set(everything) & inflight
    assert len(ctx_ids) + len(gen_ids) <= batch
    assert kv.used_device_blocks <= kv.num_device_blocks

    tokens = overshoot = 0
    for r in out.generation_requests:
        assert r.state == RequestState.GENERATION_IN_PROGRESS and kv.is_request_active(r.request_id)
        tokens += 1 + len(r.draft_tokens)
    for r in out.context_requests:
        assert r.state == RequestState.CONTEXT_INIT and kv.is_request_active(r.request_id)
        chunk = r.context_chunk_size
        assert 0 < chunk <= r.context_remaining_length
        assert kv.capacity(r) >= r.context_current_position + chunk
        if r.is_last_context_chunk:
            tokens += chunk + len(r.draft_tokens)
            if unit is not None:
                overshoot += len(r.draft_tokens)
        else:
            assert unit is not None and chunk % unit == 0
            tokens += chunk
    assert tokens == out.num_scheduled_tokens
    if max_tokens is not None:
        assert tokens <= max_tokens + overshoot
    for r in out.paused_requests:
        assert not kv.is_request_active(r.request_id)
    if peft is not None:
        adapters = {r.lora_id for r in out.context_requests + out.generation_requests} - {None}
        assert sum(peft.pages[a] for a in adapters) <= pages
    keys = [lora_key(r) for r in out.generation_requests]
    assert keys == sorted(keys)
    position = {r.request_id: k for k, r in enumerate(reqs)}
    for a, b in zip(out.generation_requests, out.generation_requests[1:]):
        if lora_key(a) == lora_key(b):
            assert position[a.request_id] < position[b.request_id]
