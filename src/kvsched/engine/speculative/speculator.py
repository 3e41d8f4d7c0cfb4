"""One speculative step in the engine: reserve draft slots, propose, verify in one target forward, and
rewind both caches to the accepted tokens.

Order within a step (TensorRT-LLM's: drafts are reserved before scheduling and proposed for the
scheduled batch): ``reserve`` before the pass (the scheduler counts ``1 + k`` tokens and KV per
generation, the draft cache follows the main one), ``run`` as the loop's runner, ``settle`` after the
step update. The main cache gives back the capacity of rejected drafts (``revert`` to its history), so
the next step grows from the right place; the draft proposer does the same for its own cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request
from kvsched.core.scheduler.draft_mirror import reserve_draft_slots
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.engine.logprobs import RowLogprobs, row_logprobs
from kvsched.engine.model_runner import ModelRunner
from kvsched.engine.sampler import Sampler
from kvsched.engine.speculative.proposers import ParamsOf, Proposer
from kvsched.engine.speculative.verify import processed_probs, verify_greedy, verify_sampled


@dataclass(slots=True)
class SpecCounts:
    """Per request, per step: drafts proposed and accepted (engine metrics)."""

    proposed: dict[int, int] = field(default_factory=dict)
    produced: dict[int, list[int]] = field(default_factory=dict)


class Speculator:
    """Drives one proposer with ``k`` draft tokens per decode over the target's runner and cache."""

    def __init__(
        self,
        proposer: Proposer,
        k: int,
        runner: ModelRunner,
        kv: KVCacheManager,
        sampler: Sampler,
        params_of: ParamsOf,
    ) -> None:
        if k < 1:
            raise ValueError(f"num_speculative_tokens={k} is invalid: must be >= 1")
        self.proposer = proposer
        self.k = k
        self.runner = runner
        self.kv = kv
        self.sampler = sampler
        self.params_of = params_of
        self.counts = SpecCounts()

    def reserve(self, active: Sequence[Request]) -> None:
        reserve_draft_slots(active, self.k)

    def run(
        self, out: SchedulerOutput, num_logprobs: Callable[[Request], int | None]
    ) -> dict[int, list[int]]:
        """Propose, verify and return the tokens each scheduled request produced (``1 + accepted``).

        ``self.logprobs[rid]`` then holds, for requests that want logprobs (``num_logprobs(req)`` not
        None), the raw log-probability and the top-N of each produced token.
        """
        counts = self.counts
        counts.proposed.clear()
        props = self.proposer.propose(out, self.params_of)
        for req in out.generation_requests:
            prop = props.get(req.request_id)
            req.draft_tokens = prop.tokens if prop is not None else []
            counts.proposed[req.request_id] = len(req.draft_tokens)
        rows, logits = self.runner.run(out, self.kv)
        produced: dict[int, list[int]] = {}
        self.logprobs: dict[int, RowLogprobs] = {}
        gen_ids = {r.request_id for r in out.generation_requests}
        i = 0
        while i < len(rows):
            req = rows[i]
            drafts = req.draft_tokens if req.request_id in gen_ids else []
            m = len(drafts)
            block = logits[i : i + m + 1]
            params, gen = self.params_of(req)
            if params.greedy:
                toks = verify_greedy(drafts, torch.argmax(block, dim=-1).tolist())
            else:
                prop = props.get(req.request_id)
                p = processed_probs(block, params)
                toks = verify_sampled(
                    drafts, p, None if prop is None else prop.q, gen or self.sampler.generator
                )
            produced[req.request_id] = toks
            n_top = num_logprobs(req)
            if n_top is not None:
                chosen = torch.tensor(toks, device=block.device)
                self.logprobs[req.request_id] = row_logprobs(
                    block[: len(toks)].float(), chosen, [n_top] * len(toks)
                )
            i += m + 1
        counts.produced = produced
        return produced

    def settle(self, out: SchedulerOutput) -> None:
        """After the step update: the main cache gives back what the rejected drafts took; the proposer
        rewinds its own."""
        kv = self.kv
        for rs in (out.context_requests, out.generation_requests):
            for req in rs:
                if kv.is_request_active(req.request_id):
                    kv.revert(req, kv.history(req))
        self.proposer.settle(out)
