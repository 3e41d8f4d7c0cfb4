"""The torch-free step update: chunk advance, generation transition, drafts, finishing."""

from __future__ import annotations

import pytest

from kvsched.core.errors import InvalidRequestError, UnknownRequestError
from kvsched.core.request import Request, RequestState, SamplingParams
from kvsched.core.scheduler import SchedulerOutput
from kvsched.core.step import apply_step, finish_request, token_stop


class StepKV:
    def __init__(self) -> None:
        self.history: dict[int, int] = {}
        self.freed: list[int] = []
        self.seen_tokens: list[int] = []

    def advance(self, req: Request, n: int) -> None:
        self.history[req.request_id] = self.history.get(req.request_id, 0) + n
        self.seen_tokens.append(req.num_tokens)  # tokens must be appended before the KV advances

    def free_request(self, req: Request) -> None:
        if req.request_id not in self.history:
            raise UnknownRequestError(req.request_id)
        self.freed.append(req.request_id)


def out(ctx=(), gen=(), paused=()):
    return SchedulerOutput(list(ctx), list(gen), list(paused), [], 0)


def req(rid=0, prompt=10, max_new=4, **kw):
    return Request(rid, list(range(100, 100 + prompt)), max_new, **kw)


def test_non_last_chunk_advances_without_tokens_and_last_chunk_turns_into_generation():
    kv, r = StepKV(), req()
    r.context_chunk_size = 6
    assert apply_step(out(ctx=[r]), {}, kv, now=1.0) == []
    assert r.context_current_position == 6 and r.state == RequestState.CONTEXT_INIT
    assert kv.history[0] == 6 and r.output_token_ids == [] and "first_token" not in r.metrics
    r.context_chunk_size = 4
    apply_step(out(ctx=[r]), {0: [7]}, kv, now=2.0)
    assert r.context_current_position == 10 and r.state == RequestState.GENERATION_IN_PROGRESS
    assert r.output_token_ids == [7] and kv.history[0] == 10
    assert r.metrics == {"first_token": 2.0, "last_token": 2.0}
    assert r.num_kv_tokens == kv.history[0]


def test_decode_appends_and_advances_and_finishes_at_max_tokens():
    kv, r = StepKV(), req(max_new=3)
    r.context_chunk_size = 10
    apply_step(out(ctx=[r]), {0: [1]}, kv, now=1.0)
    assert apply_step(out(gen=[r]), {0: [2]}, kv, now=2.0) == []
    finished = apply_step(out(gen=[r]), {0: [3]}, kv, now=3.0)
    assert finished == [r] and r.finish_reason == "length" and r.state == RequestState.GENERATION_COMPLETE
    assert r.output_token_ids == [1, 2, 3] and kv.freed == [0] and kv.history[0] == 12
    assert r.metrics["first_token"] == 1.0 and r.metrics["last_token"] == 3.0


def test_accepted_drafts_advance_the_kv_by_one_plus_accepted():
    kv, r = StepKV(), req(max_new=10)
    r.context_chunk_size = 10
    apply_step(out(ctx=[r]), {0: [1]}, kv)
    r.draft_tokens = [5, 6, 7]
    apply_step(out(gen=[r]), {0: [5, 6, 9]}, kv)  # two drafts accepted, one bonus token
    assert r.output_token_ids == [1, 5, 6, 9] and kv.history[0] == 13 and r.draft_tokens == []
    assert r.num_kv_tokens == kv.history[0]
    assert kv.seen_tokens[-1] == 14


def test_more_tokens_than_drafts_plus_one_is_an_error():
    kv, r = StepKV(), req()
    r.state = RequestState.GENERATION_IN_PROGRESS
    r.draft_tokens = [1]
    with pytest.raises(InvalidRequestError, match="draft"):
        apply_step(out(gen=[r]), {0: [1, 2, 3]}, kv)


def test_missing_tokens_for_a_decode_or_last_chunk_are_an_error():
    kv, r = StepKV(), req()
    r.context_chunk_size = 10
    with pytest.raises(InvalidRequestError, match="no token"):
        apply_step(out(ctx=[r]), {}, kv)
    r.state = RequestState.GENERATION_IN_PROGRESS
    with pytest.raises(InvalidRequestError):
        apply_step(out(gen=[r]), {}, kv)


@pytest.mark.parametrize("fast", [True, False])
def test_eos_stops_unless_ignored_and_stop_token_ids_stop(fast):
    def decode(r, tokens):
        if not fast:
            r.draft_tokens = [0] * (len(tokens) - 1)
        return apply_step(out(gen=[r]), {r.request_id: tokens}, kv)

    kv = StepKV()
    a = req(0, max_new=10, eos_token_ids=[2])
    a.state, kv.history[0] = RequestState.GENERATION_IN_PROGRESS, 9
    assert decode(a, [2] if fast else [0, 2, 4]) == [a] and a.finish_reason == "stop"
    assert a.output_token_ids[-1] == 2  # tokens after the stop are dropped
    b = req(1, max_new=10, eos_token_ids=[2], sampling_params=SamplingParams(ignore_eos=True))
    b.state, kv.history[1] = RequestState.GENERATION_IN_PROGRESS, 9
    assert decode(b, [2]) == [] and b.finish_reason is None
    c = req(2, max_new=10, sampling_params=SamplingParams(stop_token_ids=[42]))
    c.state, kv.history[2] = RequestState.GENERATION_IN_PROGRESS, 9
    assert decode(c, [41]) == []
    assert decode(c, [42]) == [c] and c.finish_reason == "stop"


def test_finish_at_the_last_chunk_when_one_token_is_all_that_was_asked():
    kv, r = StepKV(), req(max_new=1)
    r.context_chunk_size = 10
    assert apply_step(out(ctx=[r]), {0: [3]}, kv) == [r]
    assert r.finish_reason == "length" and kv.freed == [0]


def test_paused_requests_are_left_alone():
    kv, r = StepKV(), req()
    r.state = RequestState.GENERATION_IN_PROGRESS
    r.context_current_position = 10
    r.output_token_ids = [1]
    apply_step(out(paused=[r]), {}, kv)
    assert r.state == RequestState.GENERATION_IN_PROGRESS and r.context_current_position == 10
    assert r.output_token_ids == [1] and kv.history == {}


def test_recomputed_context_samples_the_next_token_after_prompt_plus_outputs():
    kv, r = StepKV(), req(prompt=4, max_new=5)
    r.output_token_ids = [1, 2]
    r.reset_for_recompute()
    r.context_chunk_size = r.num_context_tokens
    apply_step(out(ctx=[r]), {0: [3]}, kv)
    assert r.output_token_ids == [1, 2, 3] and kv.history[0] == 6 == r.num_kv_tokens


def test_finish_request_is_idempotent_and_tolerates_requests_without_kv():
    kv, r = StepKV(), req()
    finish_request(r, "abort", kv, now=5.0)
    assert r.finish_reason == "abort" and r.state == RequestState.GENERATION_COMPLETE
    assert r.metrics["finished"] == 5.0
    finish_request(r, "stop", kv)
    assert r.finish_reason == "abort"


def test_token_stop_follows_eos_ignore_eos_and_stop_ids():
    plain = Request(0, [1, 2], 4, sampling_params=SamplingParams(), eos_token_ids=[9])
    ignoring = Request(1, [1, 2], 4, sampling_params=SamplingParams(ignore_eos=True), eos_token_ids=[9])
    stops = Request(2, [1, 2], 4, sampling_params=SamplingParams(stop_token_ids=[5]), eos_token_ids=[9])
    assert token_stop(plain, 9) and not token_stop(plain, 5)
    assert not token_stop(ignoring, 9)
    assert token_stop(stops, 5) and token_stop(stops, 9) and not token_stop(stops, 4)
