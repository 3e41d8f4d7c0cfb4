"""Which replica holds which prefix block, per tier, kept from the replicas' KV events.

The router keys a prompt exactly as the KV manager does (``kvcache.keys``: root key of the reuse scope
(LoRA id, salt), then chained SHA-256 over whole blocks), so a key equals the ``block_hash`` of the
events the manager emitted for those tokens. Only whole blocks of the prompt minus its last token count:
that is what ``KVCacheManager.prepare_context`` looks up. Because keys are chained, a block's key already
names its whole prefix: the index is a flat dict, and a match walks the prompt's keys once.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Sequence

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.keys import chain_keys, pack_tokens, root_key
from kvsched.core.kvcache.types import DEVICE, KVEvent

#: Root keys of recent (adapter, salt) scopes, as the manager caches them.
_root = functools.lru_cache(maxsize=4096)(root_key)

_DEVICE_BIT = 1
_HOST_BIT = 2
_PENDING_BIT = 4  # routed there, not yet reported stored (see ``predict``)
_TIER_BITS = _DEVICE_BIT | _HOST_BIT


def prompt_keys(
    token_ids: Sequence[int], block_size: int, *, lora_id: int | None = None, salt: int | None = None
) -> list[bytes]:
    """Keys of the whole blocks of ``token_ids[:-1]`` in the scope (lora_id, salt): the manager's lookup."""
    if block_size < 1:
        raise ConfigError(f"block_size={block_size!r} is invalid: must be >= 1")
    nfull = (len(token_ids) - 1) // block_size
    if nfull <= 0:
        return []
    packed = pack_tokens(token_ids[: nfull * block_size])
    return chain_keys(_root(lora_id, salt), packed, block_size * 4)


class PrefixIndex:
    """Block key -> replicas holding it, with a tier bit per replica (a block moving tiers is a
    ``removed`` on the old tier then a ``stored`` on the new one, so both bits may be set briefly).

    Predicted blocks (``predict``): the keys of a prompt just routed to a replica, whose prefill has not
    published them yet. A burst of requests sharing a prefix then follows the first one instead of
    scattering before its events arrive (SGLang's router inserts a routed prompt into its tree the
    same way). A prediction lasts ``ttl`` calls of ``predict`` unless events confirm or remove it.
    """

    __slots__ = ("_where", "_held", "_pending", "_tick")

    def __init__(self) -> None:
        self._where: dict[bytes, dict[int, int]] = {}
        # replica -> its keys, so that a replica that is gone is dropped in O(its blocks)
        self._held: dict[int, set[bytes]] = {}
        # predictions in the order made: (tick, replica, keys newly predicted)
        self._pending: deque[tuple[int, int, list[bytes]]] = deque()
        self._tick = 0

    def __len__(self) -> int:
        return len(self._where)

    def replicas(self) -> list[int]:
        """Replicas with at least one indexed block."""
        return [r for r, keys in self._held.items() if keys]

    def num_blocks(self, replica: int, *, predicted: bool = False) -> int:
        """Blocks reported stored on ``replica`` (plus those only predicted there, with ``predicted``)."""
        keys = self._held.get(replica, ())
        if predicted:
            return len(keys)
        where = self._where
        return sum(1 for k in keys if where[k][replica] & _TIER_BITS)

    def predict(self, replica: int, keys: Sequence[bytes], ttl: int) -> None:
        """Mark ``keys`` as about to be on ``replica``; predictions older than ``ttl`` calls expire."""
        self._tick += 1
        tick = self._tick
        pending = self._pending
        while pending and pending[0][0] <= tick - ttl:
            self._expire(*pending.popleft())
        if ttl <= 0:
            return
        where = self._where
        held = self._held.setdefault(replica, set())
        new = []
        for key in keys:
            reps = where.get(key)
            if reps is None:
                where[key] = {replica: _PENDING_BIT}
            elif replica not in reps:
                reps[replica] = _PENDING_BIT
            else:
                continue  # known there (stored or predicted): nothing to expire later
            held.add(key)
            new.append(key)
        if new:
            pending.append((tick, replica, new))

    def _expire(self, tick: int, replica: int, keys: list[bytes]) -> None:
        where = self._where
        held = self._held.get(replica)
        for key in keys:
            reps = where.get(key)
            if reps is None:
                continue
            bits = reps.get(replica)
            if bits is None or not bits & _PENDING_BIT:
                continue
            if bits & _TIER_BITS:
                reps[replica] = bits & _TIER_BITS  # confirmed by a stored event meanwhile
                continue
            del reps[replica]
            if held is not None:
                held.discard(key)
            if not reps:
                del where[key]

    def apply(self, replica: int, events: Iterable[KVEvent]) -> None:
        """Fold one replica's events in, in order. A ``removed`` for an unknown block is ignored (the
        manager's event buffer is bounded, so a router that fell behind may miss a ``stored``)."""
        where = self._where
        held = self._held.setdefault(replica, set())
        for ev in events:
            bit = _DEVICE_BIT if ev.tier == DEVICE else _HOST_BIT
            key = ev.block_hash
            if ev.kind == "stored":
                reps = where.get(key)
                if reps is None:
                    where[key] = {replica: bit}
                else:
                    reps[replica] = reps.get(replica, 0) | bit
                held.add(key)
            elif ev.kind == "removed":
                reps = where.get(key)
                if reps is None:
                    continue
                left = reps.get(replica, 0) & ~bit & _TIER_BITS  # an eviction ends a prediction too
                if left:
                    reps[replica] = left
                    continue
                reps.pop(replica, None)
                held.discard(key)
                if not reps:
                    del where[key]
            else:
                raise ConfigError(f"KV event kind {ev.kind!r} is unknown: expected 'stored' or 'removed'")

    def remove_replica(self, replica: int) -> None:
        """Forget every block of a replica that left (died or was scaled down)."""
        where = self._where
        for key in self._held.pop(replica, ()):
            reps = where.get(key)
            if reps is not None:
                reps.pop(replica, None)
                if not reps:
                    del where[key]

    def match(self, keys: Sequence[bytes], *, predicted: bool = False) -> dict[int, tuple[int, int]]:
        """Per replica with a hit: leading blocks of ``keys`` it holds, as (on device, on host).

        A replica's chain stops at the first block it lacks; with ``predicted``, a predicted block
        counts as on the device. One dict probe per key plus one per replica still matching:
        O(len(keys) * replicas), and it stops when no replica matches.
        """
        where = self._where
        out: dict[int, tuple[int, int]] = {}
        if not keys:
            return out
        first = where.get(keys[0])
        if not first:
            return out
        need = _TIER_BITS | (_PENDING_BIT if predicted else 0)
        # replica -> [device blocks, host blocks] of its chain so far
        alive = {
            r: [0, 1] if bits & _TIER_BITS == _HOST_BIT else [1, 0]
            for r, bits in first.items()
            if bits & need
        }
        for key in keys[1:]:
            if not alive:
                break
            reps = where.get(key)
            if reps is None:
                break
            for r in list(alive):
                bits = reps.get(r, 0) & need
                if not bits:
                    dev, host = alive.pop(r)
                    out[r] = (dev, host)
                elif bits & _TIER_BITS == _HOST_BIT:
                    alive[r][1] += 1
                else:
                    alive[r][0] += 1
        for r, (dev, host) in alive.items():
            out[r] = (dev, host)
        return out
