"""One flattened forward batch: context chunks and decode tokens of many sequences, end to end.

Built once per step on the host (numpy), then moved to the model's device in one transfer per field.
The host copies of the per-sequence lengths stay with the batch so attention planning never has to
read a device tensor back (no CUDA sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvsched.core.errors import InvalidRequestError


@dataclass(slots=True)
class SeqInput:
    """What one sequence contributes to a step.

    ``token_ids`` are fed at positions ``start .. start+len-1``; their K/V land in ``block_table``;
    the last ``num_logits`` of them get logits (1 for a last chunk or a decode, 1+k to verify k draft
    tokens, 0 for a chunk that is not the last).
    """

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    num_logits: int = 1
    #: The request's LoRA adapter id (None: the base model).
    lora_id: int | None = None


@dataclass(slots=True)
class ForwardBatch:
    """Flattened inputs of one forward (see docs/design.md "Engine model seam")."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block * tokens_per_block + offset
    query_start: torch.Tensor  # [S+1] int64
    seq_lens: torch.Tensor  # [S] int64: KV length after this step
    block_tables: torch.Tensor  # [S, W] int32, 0-padded
    logits_indices: torch.Tensor  # [L] int64: rows of the flattened batch that need logits
    tokens_per_block: int
    query_lens_host: list[int]  # host copies: planning attention needs no device reads
    seq_lens_host: list[int]
    block_tables_host: np.ndarray  # [S, W] int32
    #: (adapter id, rows of its tokens [n] int64) per adapter in the batch; None when no token has one.
    lora_groups: list[tuple[int, torch.Tensor]] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @classmethod
    def build(
        cls,
        seqs: Sequence[SeqInput | tuple[Sequence[int], int, Sequence[int], int]],
        tokens_per_block: int,
        device: str | torch.device = "cpu",
    ) -> ForwardBatch:
        """Flatten ``seqs`` (``SeqInput`` or ``(token_ids, start, block_table, num_logits)`` tuples)."""
        if not seqs:
            raise InvalidRequestError("a forward batch needs at least one sequence")
        items = [s if isinstance(s, SeqInput) else SeqInput(*s) for s in seqs]
        q_lens = [len(s.token_ids) for s in items]
        seq_lens = [s.start + n for s, n in zip(items, q_lens)]
        width = max(-(-n // tokens_per_block) for n in seq_lens)
        num_tokens = sum(q_lens)
        input_ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        slots = np.empty(num_tokens, dtype=np.int64)
        tables = np.zeros((len(items), width), dtype=np.int32)
        logits: list[np.ndarray] = []
        row = 0
        for i, (s, n) in enumerate(zip(items, q_lens)):
            if n == 0 or s.start < 0:
                raise InvalidRequestError(f"sequence {i}: needs >= 1 token and start >= 0")
            if not 0 <= s.num_logits <= n:
                raise InvalidRequestError(f"sequence {i}: num_logits={s.num_logits} not in [0, {n}]")
            blocks_needed = -(-seq_lens[i] // tokens_per_block)
            if len(s.block_table) < blocks_needed:
                raise InvalidRequestError(
                    f"sequence {i}: block table has {len(s.block_table)} blocks, needs {blocks_needed}"
                )
            table = np.asarray(s.block_table[:blocks_needed], dtype=np.int64)
            tables[i, :blocks_needed] = table
            pos = np.arange(s.start, s.start + n, dtype=np.int64)
            input_ids[row : row + n] = s.token_ids
            positions[row : row + n] = pos
            slots[row : row + n] = table[pos // tokens_per_block] * tokens_per_block + pos % tokens_per_block
            if s.num_logits:
                logits.append(np.arange(row + n - s.num_logits, row + n, dtype=np.int64))
            row += n
        query_start = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        logits_idx = np.concatenate(logits) if logits else np.zeros(0, dtype=np.int64)

        def to(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        groups = None
        if any(s.lora_id is not None for s in items):
            rows_of: dict[int, list[np.ndarray]] = {}
            for i, s in enumerate(items):
                if s.lora_id is not None:
                    rows_of.setdefault(s.lora_id, []).append(
                        np.arange(query_start[i], query_start[i + 1], dtype=np.int64)
                    )
            groups = [(lora, to(np.concatenate(rs))) for lora, rs in rows_of.items()]

        return cls(
            input_ids=to(input_ids),
            positions=to(positions),
            slot_mapping=to(slots),
            query_start=to(query_start),
            seq_lens=to(np.asarray(seq_lens, dtype=np.int64)),
            block_tables=to(tables),
            logits_indices=to(logits_idx),
            tokens_per_block=tokens_per_block,
            query_lens_host=q_lens,
            seq_lens_host=seq_lens,
            block_tables_host=tables,
            lora_groups=groups,
        )
