"""Turns one scheduler step into one forward: which tokens each scheduled request feeds, where its
K/V goes (its block table), and which rows need logits.

Context request: tokens ``[context_current_position, + context_chunk_size)`` of prompt + outputs (a
recompute context includes earlier outputs); logits only for the last chunk. Generation request: the last
token plus its draft tokens at position ``num_tokens - 1``; logits for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from kvsched.core.config import CacheConfig
from kvsched.core.request import Request
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.model.llama import KVTensors, LlamaForCausalLM

if TYPE_CHECKING:
    from kvsched.engine.lora.residency import AdapterResidency
    from kvsched.engine.step_profile import StepProfile


class _BlockTables(Protocol):
    """The engine's view of the KV manager that a forward needs: each request's device blocks."""

    def block_table(self, req: Request, /) -> list[int]: ...


class ModelRunner:
    """Runs the model on a ``SchedulerOutput``; owns nothing but references."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        storage: KVTensors,
        cache_config: CacheConfig,
        lora: AdapterResidency | None = None,
    ) -> None:
        self.model = model
        #: With LoRA adapters: makes each step's adapters resident on the device before its forward.
        self.lora = lora
        self.storage = storage
        self.tokens_per_block = cache_config.tokens_per_block
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        #: Set by the engine with ``EngineArgs.profile_steps``: laps ``batch_build`` and ``forward``.
        self.profile: StepProfile | None = None

    def build_batch(
        self, scheduled: SchedulerOutput, kv: _BlockTables
    ) -> tuple[ForwardBatch | None, list[Request]]:
        """The flattened batch and, per logits row, the request it belongs to (1 + drafts rows each)."""
        seqs: list[SeqInput] = []
        rows: list[Request] = []
        for req in scheduled.context_requests:
            start, n = req.context_current_position, req.context_chunk_size
            last = req.is_last_context_chunk
            seqs.append(
                SeqInput(
                    req.token_slice(start, start + n), start, kv.block_table(req), int(last), req.lora_id
                )
            )
            if last:
                rows.append(req)
        for req in scheduled.generation_requests:
            pos = req.num_tokens - 1
            drafts: Sequence[int] = req.draft_tokens
            tokens = [req.token_at(pos), *drafts] if drafts else [req.token_at(pos)]
            seqs.append(SeqInput(tokens, pos, kv.block_table(req), len(tokens), req.lora_id))
            rows.extend([req] * len(tokens))
        if not seqs:
            return None, rows
        return ForwardBatch.build(seqs, self.tokens_per_block, self.device), rows

    def run(self, scheduled: SchedulerOutput, kv: _BlockTables) -> tuple[list[Request], torch.Tensor]:
        """Forward one step -> (request per logits row, logits ``[rows, vocab]`` fp32)."""
        batch, rows = self.build_batch(scheduled, kv)
        if batch is None:
            return rows, torch.empty(0, self.vocab_size, device=self.device)
        if self.lora is not None and batch.lora_groups is not None:
            self.lora.prepare(lora for lora, _ in batch.lora_groups)
        prof = self.profile
        if prof is None:
            return rows, self.model(batch, self.storage)
        prof.lap("batch_build")
        logits = self.model(batch, self.storage)
        prof.lap("forward")
        return rows, logits
