"""Speculative decoding in the engine loop (``EngineArgs.speculative``): the proposer it names, the
step runner that proposes and verifies in one target forward, and the outputs of a step that may
append several tokens per request.

Split out of engine.py: the proposers, verification and cache rewind live in engine/speculative/;
this is what the engine loop adds around them (tokens per request, acceptance metrics, text).
"""

from __future__ import annotations

import itertools

from kvsched.core.kvcache import KVCacheManager
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.outputs import StepOutput
from kvsched.engine.parts import EngineParts
from kvsched.engine.request_book import RequestBook
from kvsched.engine.sampler import Sampler
from kvsched.engine.speculative.proposers import ParamsOf
from kvsched.engine.speculative.speculator import Speculator

__all__ = ["SpeculativeStep", "make_speculator"]


def make_speculator(
    args: EngineArgs, parts: EngineParts, sampler: Sampler, params_of: ParamsOf
) -> Speculator | None:
    """The speculator of ``args.speculative`` ("ngram" or a draft model), or None without one."""
    if args.speculative is None:
        return None
    from kvsched.engine.speculative import DraftModelProposer, NgramProposer, Proposer

    proposer: Proposer
    if args.speculative == "ngram":
        proposer = NgramProposer()
    else:
        assert parts.draft_model is not None and parts.draft_storage is not None
        assert parts.draft_kv is not None
        proposer = DraftModelProposer(parts.draft_model, parts.draft_storage, parts.draft_kv)
    return Speculator(proposer, args.num_speculative_tokens, parts.runner, parts.kv, sampler, params_of)


class SpeculativeStep:
    """The engine's runner and step outputs with speculation (the synchronous loop only)."""

    __slots__ = ("spec", "book", "kv", "_before")

    def __init__(self, spec: Speculator, book: RequestBook, kv: KVCacheManager) -> None:
        self.spec = spec
        self.book = book
        self.kv = kv
        #: request id -> output length before this step (a step may append several tokens).
        self._before: dict[int, int] = {}

    def run(self, out: SchedulerOutput) -> dict[int, list[int]]:
        """The loop's runner with speculation: propose, verify in one target forward."""
        tracked = self.book.tracked
        self._before = {
            r.request_id: len(r.output_token_ids)
            for rs in (out.context_requests, out.generation_requests)
            for r in rs
        }
        return self.spec.run(out, lambda r: tracked[r.request_id].params.logprobs)

    def outputs(self, out: SchedulerOutput, now: float) -> list[StepOutput]:
        """Rewind both caches to the accepted tokens, then emit each request's new tokens."""
        spec, book = self.spec, self.book
        stats = book.stats
        spec.settle(out)
        proposed = spec.counts.proposed
        outputs = []
        produced = 0
        for req in itertools.chain(out.context_requests, out.generation_requests):
            before = self._before.get(req.request_id)
            if before is None or len(req.output_token_ids) == before:
                continue  # a context chunk that is not the last
            tracked = book.tracked[req.request_id]
            new = req.output_token_ids[before:]
            produced += len(new)
            k = proposed.get(req.request_id, 0)
            if k:
                m = tracked.metrics
                m.num_speculative_steps += 1
                m.num_draft_tokens += k
                m.num_accepted_draft_tokens += len(new) - 1
                stats.record_speculation(k, len(new) - 1)
            outputs.append(book.emit_many(tracked, before, new, spec.logprobs.get(req.request_id), now))
        stats.record_step(out, produced, self.kv)
        return outputs
