"""The step update over whole batches: every scheduled request moves, timestamps land where they
belong, drafts are cleared for the next proposal, and a stop part-way through drafts writes only the
KV of the tokens it kept."""

from __future__ import annotations

from kvsched.core.request import Request, RequestState
from kvsched.core.scheduler import SchedulerOutput
from kvsched.core.step import apply_step


class RecordingKV:
    def __init__(self) -> None:
        self.advances: list[tuple[int, int]] = []
        self.freed: list[int] = []

    def advance(self, req: Request, n: int) -> None:
        self.advances.append((req.request_id, n))

    def free_request(self, req: Request) -> None:
        self.freed.append(req.request_id)


def out(ctx=(), gen=()):
    return SchedulerOutput(list(ctx), list(gen), [], [], 0)


def req(rid=0, prompt=10, max_new=8, **kw):
    return Request(rid, list(range(100, 100 + prompt)), max_new, eos_token_ids=[2], **kw)


def decoding(rid=0, max_new=8, **kw):
    r = req(rid, max_new=max_new, **kw)
    r.context_current_position = r.num_context_tokens
    r.output_token_ids = [50]
    r.state = RequestState.GENERATION_IN_PROGRESS
    return r


def test_every_non_last_chunk_of_a_step_advances():
    kv = RecordingKV()
    a, b = req(0, prompt=16), req(1, prompt=16)
    a.context_chunk_size = b.context_chunk_size = 4
    assert apply_step(out(ctx=[a, b]), {}, kv, now=1.0) == []
    assert kv.advances == [(0, 4), (1, 4)]
    assert a.context_current_position == b.context_current_position == 4


def test_every_generation_of_a_step_gets_its_token():
    kv = RecordingKV()
    a, b, c = decoding(0), decoding(1), decoding(2)
    assert apply_step(out(gen=[a, b, c]), {0: [11], 1: [12], 2: [13]}, kv, now=1.0) == []
    assert [r.output_token_ids[-1] for r in (a, b, c)] == [11, 12, 13]
    assert kv.advances == [(0, 1), (1, 1), (2, 1)]


def test_a_context_finished_again_after_recompute_keeps_its_first_token_time():
    kv = RecordingKV()
    r = req(max_new=4)
    r.context_chunk_size = 10
    apply_step(out(ctx=[r]), {0: [7]}, kv, now=1.0)
    r.reset_for_recompute()
    r.context_chunk_size = r.num_context_tokens
    apply_step(out(ctx=[r]), {0: [8]}, kv, now=5.0)
    assert r.metrics["first_token"] == 1.0 and r.metrics["last_token"] == 5.0


def test_without_a_clock_times_are_zero():
    r = req(max_new=1)
    r.context_chunk_size = 10
    apply_step(out(ctx=[r]), {0: [7]}, RecordingKV())
    assert r.metrics == {"first_token": 0.0, "last_token": 0.0, "finished": 0.0}


def test_drafts_are_cleared_to_an_empty_list_after_every_verification():
    kv = RecordingKV()
    c = req(0)
    c.context_chunk_size = 10
    c.draft_tokens = [3, 4]
    g_none, g_some = decoding(1), decoding(2)
    g_none.draft_tokens = [5, 6]
    g_some.draft_tokens = [5, 6]
    apply_step(out(ctx=[c], gen=[g_none, g_some]), {0: [9], 1: [9], 2: [5, 9]}, kv, now=1.0)
    assert c.draft_tokens == [] and g_none.draft_tokens == [] and g_some.draft_tokens == []
    assert g_some.output_token_ids == [50, 5, 9] and g_none.output_token_ids == [50, 9]


def test_finishing_records_the_step_time_on_every_path():
    kv = RecordingKV()
    at_prefill = req(0, max_new=1)
    at_prefill.context_chunk_size = 10
    fast = decoding(1)
    slow = decoding(2)
    slow.draft_tokens = [5]
    done = apply_step(out(ctx=[at_prefill], gen=[fast, slow]), {0: [7], 1: [2], 2: [5, 2]}, kv, now=3.5)
    assert done == [at_prefill, fast, slow] and kv.freed == [0, 1, 2]
    for r in done:
        assert r.metrics["finished"] == 3.5 and r.metrics["last_token"] == 3.5


def test_a_draft_verification_updates_the_last_token_time():
    kv = RecordingKV()
    g = decoding(0)
    g.metrics["last_token"] = 1.0
    g.draft_tokens = [5, 6]
    assert apply_step(out(gen=[g]), {0: [5, 9]}, kv, now=2.0) == []
    assert g.metrics["last_token"] == 2.0


def test_a_stop_part_way_through_accepted_drafts_advances_only_the_kept_tokens():
    kv = RecordingKV()
    g = decoding(0)
    g.draft_tokens = [5, 2, 6]
    assert apply_step(out(gen=[g]), {0: [5, 2, 6, 8]}, kv, now=1.0) == [g]
    assert g.output_token_ids == [50, 5, 2] and g.finish_reason == "stop"
    assert kv.advances == [(0, 2)]


def test_a_last_chunk_that_stops_on_a_draft_advances_the_chunk_and_the_kept_drafts():
    kv = RecordingKV()
    c = req(0)
    c.context_chunk_size = 10
    c.draft_tokens = [4, 2, 6]
    assert apply_step(out(ctx=[c]), {0: [3, 4, 2, 6]}, kv, now=1.0) == [c]
    assert c.output_token_ids == [3, 4, 2]
    assert kv.advances == [(0, 10 + 2)]


def test_a_stop_token_id_stops_on_the_one_token_path_and_others_continue():
    kv = RecordingKV()
    from kvsched.core.request import SamplingParams

    g = decoding(0, sampling_params=SamplingParams(stop_token_ids=[42, 43]))
    assert apply_step(out(gen=[g]), {0: [41]}, kv, now=1.0) == []
    assert apply_step(out(gen=[g]), {0: [43]}, kv, now=2.0) == [g] and g.finish_reason == "stop"
