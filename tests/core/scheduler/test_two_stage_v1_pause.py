"""MAX_UTILIZATION as TensorRT-LLM's V1 runs it, on the real KV manager: a first chunk sizes and takes the
whole context (V1 ``getNeededBlocksOneStep`` / ``addSequence``), a pause drops the KV, and with block
reuse only full, computed blocks that were not evicted in the meantime come back."""

from __future__ import annotations

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request
from kvsched.core.scheduler import TwoStageScheduler
from kvsched.core.step import apply_step

TPB = 4


def manager(blocks: int, reuse: bool = True) -> KVCacheManager:
    return KVCacheManager(
        CacheConfig(tokens_per_block=TPB, num_device_blocks=blocks, enable_block_reuse=reuse)
    )


def scheduler(kv: KVCacheManager, policy: str = "max_utilization", tokens: int = 8) -> TwoStageScheduler:
    return TwoStageScheduler(kv, policy=policy, max_batch_size=8, max_num_tokens=tokens, chunk_unit_size=TPB)


def step(sched: TwoStageScheduler, kv: KVCacheManager, active: list[Request]):
    out = sched.schedule(active)
    sampled = {r.request_id: [7] for r in out.generation_requests}
    for r in out.context_requests:
        if r.context_current_position + r.context_chunk_size == r.num_context_tokens:
            sampled[r.request_id] = [7]
    apply_step(out, sampled, kv)
    return out


def test_a_first_chunk_takes_the_whole_prompt_and_later_chunks_take_nothing():
    kv = manager(blocks=8)
    r = Request(0, list(range(1, 17)), 4)  # 16 tokens: 4 blocks, two chunks of 8
    sched = scheduler(kv)
    out = step(sched, kv, [r])
    assert [x.request_id for x in out.context_requests] == [0] and r.context_current_position == 8
    assert kv.num_free_device_blocks == 8 - 4  # V1: the whole prompt, not the 2 blocks of the chunk
    step(sched, kv, [r])
    assert r.context_current_position == 16 and kv.num_free_device_blocks == 8 - 4


def test_a_context_whose_whole_prompt_does_not_fit_waits_even_if_its_chunk_would():
    kv = manager(blocks=3)
    r = Request(0, list(range(1, 17)), 4)  # the first chunk needs 2 blocks, the prompt 4
    out = step(scheduler(kv), kv, [r])
    assert out.context_requests == [] and out.preempted_requests == []
    assert kv.num_free_device_blocks == 3
    # the chunked (non-V1) estimate of GUARANTEED_NO_EVICT is not what changed: it still needs it all
    assert step(scheduler(kv, "guaranteed_no_evict"), kv, [r]).context_requests == []


def run_until_decoding(sched: TwoStageScheduler, kv: KVCacheManager, reqs: list[Request]) -> None:
    for _ in range(8):
        if all(r.output_token_ids for r in reqs):
            return
        step(sched, kv, reqs)
    raise AssertionError("requests did not reach decode")


def test_a_pause_drops_the_kv_and_reuse_brings_back_only_full_computed_blocks():
    kv = manager(blocks=6)
    old, new = Request(0, list(range(1, 13)), 9), Request(1, list(range(101, 111)), 9)
    sched = scheduler(kv, tokens=24)
    run_until_decoding(sched, kv, [old, new])  # prompts of 3 + 3 blocks fill the pool
    for _ in range(4):  # old's KV grows into a 4th block: the newest started request (new) is paused
        out = step(sched, kv, [old, new])
        if out.preempted_requests:
            break
    assert [r.request_id for r in out.preempted_requests] == [1]
    assert new.num_preemptions == 1 and not kv.is_request_active(1)
    context = new.num_context_tokens  # prompt + its outputs so far: prefilled again
    full = (context - 1) // TPB * TPB  # V1 stores (length - 1) tokens; the partial last block is lost
    old.max_new_tokens = len(old.output_token_ids) + 1  # old finishes next step: room for new again
    step(sched, kv, [old, new])
    out = step(sched, kv, [new])
    assert [r.request_id for r in out.context_requests] == [1]
    assert new.num_reused_tokens == full  # the full blocks came back, the partial one is recomputed


def test_blocks_evicted_while_paused_are_recomputed():
    kv = manager(blocks=6)
    old, new = Request(0, list(range(1, 13)), 9), Request(1, list(range(101, 111)), 9)
    sched = scheduler(kv, tokens=24)
    run_until_decoding(sched, kv, [old, new])
    for _ in range(4):
        if step(sched, kv, [old, new]).preempted_requests:
            break
    assert new.num_preemptions == 1
    other = Request(2, list(range(201, 209)), 1)  # 8 tokens: takes the 2 blocks new left cached
    old.max_new_tokens = len(old.output_token_ids) + 1
    step(sched, kv, [old, other])  # old finishes; other (arrived while new waited behind old) runs
    out = step(sched, kv, [new])
    assert [r.request_id for r in out.context_requests] == [1]
    assert new.num_reused_tokens < (new.num_context_tokens - 1) // TPB * TPB
