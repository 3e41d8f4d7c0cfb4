"""Engine faults fail only the affected request(s): the rest finish with HF's exact greedy tokens, the
engine keeps serving, and the KV manager's invariants hold after every step (no block leaks).

Faults enter through wrappers of the real parts (tests/engine/faults.py), one test per fault."""

from __future__ import annotations

import pytest
from engine_testlib import random_prompts
from faults import FaultyTokenizer, faulty_engine, run_checked

from kvsched.core.errors import InvalidRequestError
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.types import Tier
from kvsched.core.request import SamplingParams
from kvsched.core.scheduler.output import SchedulerOutput

GREEDY = 0.0
# Six requests of up to 6 blocks cannot all sit in 14 device blocks: some are suspended to the host.
PRESSURE = {"tokens_per_block": 8, "num_device_blocks": 14, "enable_block_reuse": False}
PRESSURE_PROMPTS = random_prompts([10, 14, 20, 12, 18, 9], seed=3)


def _submit(ex, prompts, max_tokens):
    return [ex.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=GREEDY)) for p in prompts]


def _split(results, ids):
    failed = [rid for rid in ids if results[rid].outputs[0].finish_reason == "error"]
    return failed, [rid for rid in ids if rid not in failed]


@pytest.mark.parametrize("fail_call", [1, 3])  # the first prefill, a decode step
def test_forward_exception_fails_that_steps_requests_only(tiny_llama_dir, hf_ref, fail_call):
    ex = faulty_engine(
        tiny_llama_dir, model_fail_on={fail_call}, max_batch_size=2, tokens_per_block=8, num_device_blocks=64
    )
    prompts = random_prompts([5, 9, 7], seed=21)
    ids = _submit(ex, prompts, 8)
    results = run_checked(ex)
    failed, ok = _split(results, ids)
    assert failed == ids[:2] and ok == ids[2:]  # the batch of that step: the first two
    for rid, prompt in zip(ids, prompts):
        out = results[rid]
        want = hf_ref.greedy(prompt, 8)
        if rid in failed:
            assert f"injected forward fault (call {fail_call})" in out.error
            assert out.outputs[0].token_ids == want[: fail_call - 1]  # what came before the fault stands
        else:
            assert out.error is None and out.outputs[0].token_ids == want
    # The engine keeps serving: a new wave runs exactly.
    more = random_prompts([6, 11], seed=22)
    again = run_checked_after(ex, more)
    assert again == [hf_ref.greedy(p, 8) for p in more]


def run_checked_after(ex, prompts):
    ids = _submit(ex, prompts, 8)
    results = run_checked(ex)
    return [results[rid].outputs[0].token_ids for rid in ids]


@pytest.mark.parametrize(
    ("src", "dst", "what"),
    [(Tier.DEVICE, Tier.HOST, "suspend"), (Tier.HOST, Tier.DEVICE, "resume")],
)
def test_failed_copy_fails_the_request_being_moved_only(tiny_llama_dir, hf_ref, src, dst, what):
    ex = faulty_engine(tiny_llama_dir, storage_fault=(src, dst), num_host_blocks=64, **PRESSURE)
    ids = _submit(ex, PRESSURE_PROMPTS, 28)
    results = run_checked(ex)
    assert ex.kv._store.storage.failed == 1, f"no {what} copy was attempted"
    failed, ok = _split(results, ids)
    assert len(failed) == 1, f"the {what} fault should fail exactly the request being moved"
    assert f"{src.name} -> {dst.name}" in results[failed[0]].error
    assert "injected copy fault" in results[failed[0]].error
    for rid, prompt in zip(ids, PRESSURE_PROMPTS):
        if rid in ok:
            assert results[rid].outputs[0].token_ids == hf_ref.greedy(prompt, 28)
    assert ex.kv.stats().num_suspends > 1  # the engine went on suspending and resuming


@pytest.mark.parametrize("num_host_blocks", [0, 1])
def test_full_host_tier_degrades_and_every_request_finishes_exactly(tiny_llama_dir, hf_ref, num_host_blocks):
    ex = faulty_engine(tiny_llama_dir, num_host_blocks=num_host_blocks, **PRESSURE)
    ids = _submit(ex, PRESSURE_PROMPTS, 28)
    results = run_checked(ex)
    for rid, prompt in zip(ids, PRESSURE_PROMPTS):
        assert results[rid].outputs[0].finish_reason == "length"
        assert results[rid].outputs[0].token_ids == hf_ref.greedy(prompt, 28)
    assert ex.stats.num_preempted > 0  # the host could not take the victims: they were recomputed


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_tokenizer_faults_fail_that_request_alone(tiny_llama_dir, hf_ref, speculative):
    """With speculation the tokens of a step go out through ``emit_many``: the same rule."""
    healthy = random_prompts([7, 12], seed=23)
    want = [hf_ref.greedy(p, 8) for p in healthy]
    poison = min(set(range(256)) - {t for seq in healthy + want for t in seq})  # only one request meets it
    ex = faulty_engine(
        tiny_llama_dir,
        tokenizer=FaultyTokenizer(poison),
        tokens_per_block=8,
        num_device_blocks=64,
        speculative=speculative,
    )
    with pytest.raises(InvalidRequestError, match="tokenizer failed on the prompt: InjectedFault"):
        ex.add_request("boom", SamplingParams(max_tokens=4))
    assert not ex.has_unfinished_requests() and ex.kv.stats().num_requests == 0
    poisoned = random_prompts([6], seed=24)[0] + [poison]
    ids = _submit(ex, [healthy[0], poisoned, healthy[1]], 8)
    results = run_checked(ex)
    bad = results[ids[1]]
    assert (
        bad.outputs[0].finish_reason == "error"
        and "detokenizing its output raised InjectedFault" in bad.error
    )
    assert [results[i].outputs[0].token_ids for i in (ids[0], ids[2])] == want
    assert results[ids[0]].outputs[0].text == bytes(want[0]).decode("utf-8", "replace")


def test_abort_while_suspended_frees_its_host_blocks(tiny_llama_dir, hf_ref):
    ex = faulty_engine(tiny_llama_dir, num_host_blocks=64, **PRESSURE)
    ids = _submit(ex, PRESSURE_PROMPTS, 28)
    results = {}
    victim = None
    while victim is None:
        for o in ex.step():
            assert not o.finished
        suspended = [r for r in ids if ex.kv.has_request(r) and not ex.kv.is_request_active(r)]
        if suspended and ex.kv.history(ex._tracked[suspended[0]].req) > 0:
            victim = suspended[0]
    assert ex.kv.stats().used_host_blocks > 0
    ex.abort_request(victim)
    check_invariants(ex.kv)
    results[victim] = ex.pop_output(victim)
    results.update(run_checked(ex))
    assert results[victim].outputs[0].finish_reason == "abort"
    for rid, prompt in zip(ids, PRESSURE_PROMPTS):
        if rid != victim:
            assert results[rid].outputs[0].token_ids == hf_ref.greedy(prompt, 28)


class _SuspendOnce:
    """The engine's scheduler, but one pass only suspends a running request and runs nothing."""

    def __init__(self, inner, kv) -> None:  # noqa: ANN001
        self.inner, self.kv, self.done = inner, kv, False

    def schedule(self, active, inflight_request_ids=frozenset()):  # noqa: ANN001, ANN201
        running = [r for r in active if self.kv.is_request_active(r.request_id) and r.num_tokens > 9]
        if not self.done and running:
            self.done = True
            self.kv.suspend_request(running[0])
            return SchedulerOutput(paused_requests=[running[0]])
        return self.inner.schedule(active, inflight_request_ids)


def test_a_step_that_only_suspends_is_counted(tiny_llama_dir, hf_ref):
    ex = faulty_engine(tiny_llama_dir, num_host_blocks=64, tokens_per_block=8, num_device_blocks=64)
    ex.loop.scheduler = _SuspendOnce(ex.loop.scheduler, ex.kv)
    prompts = random_prompts([9, 5], seed=25)
    ids = _submit(ex, prompts, 6)
    results = run_checked(ex)
    assert ex.stats.num_paused == 1 and ex.kv.stats().num_suspends == 1
    assert [results[i].outputs[0].token_ids for i in ids] == [hf_ref.greedy(p, 6) for p in prompts]
