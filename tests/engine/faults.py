"""Fault injectors for the engine tests: wrappers around the real model, KV storage and tokenizer that
raise where a test says, so a fault enters through the same seam a real one would (no monkeypatching)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from kvsched.core.kvcache import KVCacheManager
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.types import Tier
from kvsched.core.scheduler import make_scheduler
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.hf import load_hf_folder


class InjectedFault(RuntimeError):
    """What every injector raises."""


class FaultyModel(torch.nn.Module):
    """The model, but forward call number ``n`` (1-based) raises for every ``n`` in ``fail_on``."""

    def __init__(self, inner: torch.nn.Module, fail_on: set[int]) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.fail_on = set(fail_on)
        self.calls = 0

    def forward(self, batch, storage):  # noqa: ANN001 - the model's own signature
        self.calls += 1
        if self.calls in self.fail_on:
            raise InjectedFault(f"injected forward fault (call {self.calls})")
        return self.inner(batch, storage)


class FaultyStorage:
    """The KV storage, but the ``nth`` copy from ``src`` to ``dst`` tier raises (nothing copied)."""

    def __init__(self, inner, src: Tier, dst: Tier, nth: int = 1) -> None:  # noqa: ANN001
        self.inner = inner
        self.direction = (src, dst)
        self.nth = nth
        self.seen = 0
        self.failed = 0
        self.num_device_blocks = inner.num_device_blocks
        self.num_host_blocks = inner.num_host_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.inner.bytes_per_block

    def copy_blocks(self, src_tier: Tier, src: Sequence[int], dst_tier: Tier, dst: Sequence[int]) -> None:
        if (src_tier, dst_tier) == self.direction:
            self.seen += 1
            if self.seen == self.nth:
                self.failed += 1
                raise InjectedFault(
                    f"injected copy fault ({len(src)} blocks {src_tier.name} -> {dst_tier.name})"
                )
        self.inner.copy_blocks(src_tier, src, dst_tier, dst)


class FaultyTokenizer:
    """One token per byte; ``encode`` raises on text holding "boom", ``decode`` on the ``poison`` token."""

    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, poison: int = 255) -> None:
        self.poison = poison

    def encode(self, text: str) -> list[int]:
        if "boom" in text:
            raise InjectedFault("injected tokenizer fault")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        if self.poison in ids:
            raise InjectedFault("injected detokenizer fault")
        return bytes(ids).decode("utf-8", "replace")


def faulty_engine(path, *, model_fail_on=None, storage_fault=None, tokenizer=None, **kwargs) -> Engine:  # noqa: ANN001
    """An engine over the tiny checkpoint with the chosen injectors in place of the real parts."""
    args = EngineArgs(model=str(path), **kwargs)
    model, config = load_hf_folder(path, dtype=torch.float32, device="cpu")
    if model_fail_on:
        model = FaultyModel(model, model_fail_on)
    parts = build_engine_parts(args, loaded=(model, config, tokenizer))
    if storage_fault is not None:
        kv = KVCacheManager(parts.cache_config, storage=FaultyStorage(parts.storage, *storage_fault))
        scheduler = make_scheduler(
            args.scheduler,
            kv,
            max_batch_size=args.max_batch_size,
            max_num_tokens=args.max_num_tokens,
            chunk_unit_size=args.chunk_unit_size,
            priority_mode=args.priority_mode,
        )
        parts = dataclasses.replace(parts, kv=kv, scheduler=scheduler)
    return Engine(args, parts=parts)


def run_checked(ex: Engine) -> dict:
    """Step to the end, checking the KV manager's invariants after every step, and that the engine's
    active list is exactly its unfinished book (a failed request leaves both in its step); the results
    by id."""
    results = {}
    while ex.has_unfinished_requests():
        for o in ex.step():
            if o.finished:
                results[o.request_id] = ex.pop_output(o.request_id)
        check_invariants(ex.kv)
        assert sorted(r.request_id for r in ex._active) == sorted(ex.book.tracked)
    stats = ex.kv.stats()
    assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0
    return results
