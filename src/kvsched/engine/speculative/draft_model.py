"""A draft model with its own paged KV cache, and the truncated copy of the target used by default.

The draft cache is a second ``KVCacheManager``; the scheduler keeps it at the main cache's capacity for
every scheduled request (``core/scheduler/draft_mirror.py``, as TensorRT-LLM PR #11939's
``_prepare_draft_resources``). Its history may lag behind the target's (the two caches reuse prefixes
and evict independently), so each step the draft first computes the positions it is missing - the same
context chunk as the target, or, for a decode, everything up to the last token - and then proposes ``k``
tokens autoregressively. After the step update it keeps the KV of the drafts the target accepted and
gives the rest back (``settle``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.speculative.proposers import ParamsOf, Proposal
from kvsched.engine.speculative.verify import processed_probs


def truncated_copy(target: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """The target's first ``num_layers`` layers with its embeddings, final norm and head (shared
    weights, no copy): a draft model with the target's vocabulary and no extra download."""
    total = target.config.num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"draft_num_layers={num_layers} is invalid: the target has {total} layers")
    cfg = dataclasses.replace(target.config, num_layers=num_layers)
    with torch.device("meta"):
        draft = LlamaForCausalLM(cfg)
    src, dst = target.model, draft.model
    dst.embed_tokens = src.embed_tokens
    dst.layers = nn.ModuleList(list(src.layers)[:num_layers])
    dst.norm = src.norm
    dst.rotary = src.rotary
    draft.lm_head = target.lm_head
    return draft.eval()


class DraftModelProposer:
    """Proposes with a small model over its own KV cache (see the module docstring)."""

    def __init__(self, model: LlamaForCausalLM, storage: TensorKVStorage, kv: KVCacheManager) -> None:
        self.model = model
        self.storage = storage
        self.kv = kv
        self.tpb = kv.tokens_per_block
        self.device = next(model.parameters()).device
        #: request id -> the draft history this step can validate at most (see ``settle``).
        self._valid_end: dict[int, int] = {}

    def propose(self, out: SchedulerOutput, params_of: ParamsOf) -> dict[int, Proposal]:
        kv = self.kv
        valid = self._valid_end
        valid.clear()
        seqs: list[SeqInput] = []
        for req in out.context_requests:  # the same chunk as the target (plus what the draft lacks)
            h = kv.history(req)
            end = req.context_current_position + req.context_chunk_size
            valid[req.request_id] = max(h, end)
            if h < end:
                seqs.append(SeqInput(req.token_slice(h, end), h, kv.block_table(req), 0))
        gens: list[Request] = []
        for req in out.generation_requests:
            h, n = kv.history(req), req.num_tokens
            k = len(req.draft_tokens)
            valid[req.request_id] = n + k - 1 if k else h
            if k:  # everything the draft lacks up to the last token; its logits give the first draft
                seqs.append(SeqInput(req.token_slice(h, n), h, kv.block_table(req), 1))
                gens.append(req)
        if not seqs:
            return {}
        logits = self._forward(seqs)
        drafts: dict[int, list[int]] = {r.request_id: [] for r in gens}
        qs: dict[int, list[torch.Tensor]] = {r.request_id: [] for r in gens}
        live = gens
        while True:
            for row, req in enumerate(live):
                params, gen = params_of(req)
                if params.greedy:
                    tok = int(torch.argmax(logits[row]))
                else:
                    q = processed_probs(logits[row : row + 1], params)[0]
                    tok = int(torch.multinomial(q, 1, generator=gen).item())
                    qs[req.request_id].append(q)
                drafts[req.request_id].append(tok)
            live = [r for r in live if len(drafts[r.request_id]) < len(r.draft_tokens)]
            if not live:
                break
            seqs = []
            for req in live:
                d = drafts[req.request_id]
                seqs.append(SeqInput([d[-1]], req.num_tokens - 1 + len(d), kv.block_table(req), 1))
            logits = self._forward(seqs)
        return {
            rid: Proposal(toks, torch.stack(qs[rid]) if qs[rid] else None) for rid, toks in drafts.items()
        }

    def _forward(self, seqs: list[SeqInput]) -> torch.Tensor:
        return self.model(ForwardBatch.build(seqs, self.tpb, self.device), self.storage)

    def settle(self, out: SchedulerOutput) -> None:
        """Advance each draft cache over the positions the accepted tokens validated; give back the rest.

        A draft ``d_i`` was fed at position ``n - 1 + i``; the target kept ``a`` drafts, so the draft KV
        is right up to ``min(n + a, n + k - 1)`` = ``min(num_tokens - 1, valid_end)`` now.
        """
        kv = self.kv
        for rs in (out.context_requests, out.generation_requests):
            for req in rs:
                rid = req.request_id
                if not kv.is_request_active(rid):
                    continue  # finished (freed with the main cache) or never mirrored
                h = kv.history(req)
                end = min(req.num_tokens - 1, self._valid_end.get(rid, h))
                if end > h:
                    kv.advance(req, end - h)
                kv.revert(req, kv.history(req))
