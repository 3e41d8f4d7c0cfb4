"""Which replica holds which prefix block, per tier, kept from the replicas' KV events.

The router keys a prompt exactly as the KV manager does (``kvcache.keys``: root key of the reuse scope
(LoRA id, salt), then chained SHA-256 over whole blocks), so a key equals the ``block_hash`` of the
events the manager emitted for those tokens. Only whole blocks of the prompt minus its last token count:
that is what ``KVCacheManager.prepare_context`` looks up. Because keys are chained, a block's key already
names its whole prefix: each replica's part of the index is a flat dict (key -> tier bits), and a match
walks the prompt's keys per replica until its first miss.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.keys import cached_root_key, chain_keys, pack_tokens
from kvsched.core.kvcache.types import DEVICE, KVEvent

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
    return chain_keys(cached_root_key(lora_id, salt), packed, block_size * 4)


class PrefixIndex:
    """Per replica: block key -> tier bits (a block moving tiers is a ``removed`` on the old tier then a
    ``stored`` on the new one, so both bits may be set briefly).

    Predicted blocks (``predict``): the keys of a prompt just routed to a replica, whose prefill has not
    published them yet. A burst of requests sharing a prefix then follows the first one instead of
    scattering before its events arrive (SGLang's router inserts a routed prompt into its tree the
    same way). A prediction lasts ``ttl`` calls of ``predict`` unless events confirm or remove it.
    """

    __slots__ = ("_blocks", "_pending", "_tick")

    def __init__(self) -> None:
        # replica -> {block key: bits}; one event is one dict operation, a replica that left one del
        self._blocks: dict[int, dict[bytes, int]] = {}
        # predictions in the order made: (tick, replica, keys newly predicted)
        self._pending: deque[tuple[int, int, list[bytes]]] = deque()
        self._tick = 0

    def __len__(self) -> int:
        """Distinct keys held (stored or predicted) by any replica (a diagnostic: O(index size))."""
        return len(set().union(*self._blocks.values())) if self._blocks else 0

    def replicas(self) -> list[int]:
        """Replicas with at least one indexed block."""
        return [r for r, blocks in self._blocks.items() if blocks]

    def num_blocks(self, replica: int, *, predicted: bool = False) -> int:
        """Blocks reported stored on ``replica`` (plus those only predicted there, with ``predicted``)."""
        blocks = self._blocks.get(replica, {})
        if predicted:
            return len(blocks)
        return sum(1 for bits in blocks.values() if bits & _TIER_BITS)

    def predict(self, replica: int, keys: Sequence[bytes], ttl: int) -> None:
        """Mark ``keys`` as about to be on ``replica``; predictions older than ``ttl`` calls expire."""
        self._tick += 1
        tick = self._tick
        pending = self._pending
        while pending and pending[0][0] <= tick - ttl:
            self._expire(*pending.popleft())
        if ttl <= 0:
            return
        blocks = self._blocks.setdefault(replica, {})
        new = [key for key in keys if key not in blocks]  # known there (stored or predicted): skip
        if new:
            blocks.update(dict.fromkeys(new, _PENDING_BIT))
            pending.append((tick, replica, new))

    def _expire(self, tick: int, replica: int, keys: list[bytes]) -> None:
        blocks = self._blocks.get(replica)
        if blocks is None:
            return
        for key in keys:
            bits = blocks.get(key)
            if bits is None or not bits & _PENDING_BIT:
                continue
            if bits & _TIER_BITS:
                blocks[key] = bits & _TIER_BITS  # confirmed by a stored event meanwhile
            else:
                del blocks[key]

    def apply(self, replica: int, events: Iterable[KVEvent]) -> None:
        """Fold one replica's events in, in order. A ``removed`` for an unknown block is ignored (the
        manager's event buffer is bounded, so a router that fell behind may miss a ``stored``)."""
        blocks = self._blocks.setdefault(replica, {})
        get = blocks.get
        for kind, key, tier, _parent in events:
            bit = _DEVICE_BIT if tier == DEVICE else _HOST_BIT
            if kind == "stored":
                blocks[key] = get(key, 0) | bit
            elif kind == "removed":
                bits = get(key)
                if bits is None:
                    continue
                left = bits & ~bit & _TIER_BITS  # an eviction ends a prediction too
                if left:
                    blocks[key] = left
                else:
                    del blocks[key]
            else:
                raise ConfigError(f"KV event kind {kind!r} is unknown: expected 'stored' or 'removed'")

    def remove_replica(self, replica: int) -> None:
        """Forget every block of a replica that left (died or was scaled down)."""
        self._blocks.pop(replica, None)

    def match(self, keys: Sequence[bytes], *, predicted: bool = False) -> dict[int, tuple[int, int]]:
        """Per replica with a hit: leading blocks of ``keys`` it holds, as (on device, on host).

        A replica's chain stops at the first block it lacks; with ``predicted``, a predicted block
        counts as on the device. One dict probe per matched block plus one per replica:
        O(len(keys) * replicas) at worst, and a replica that lacks the first block costs one probe.
        """
        out: dict[int, tuple[int, int]] = {}
        if not keys:
            return out
        need = _TIER_BITS | (_PENDING_BIT if predicted else 0)
        for replica, blocks in self._blocks.items():
            get = blocks.get
            dev = host = 0
            for key in keys:
                bits = get(key, 0) & need
                if not bits:
                    break
                if bits & _TIER_BITS == _HOST_BIT:
                    host += 1
                else:
                    dev += 1
            if dev or host:
                out[replica] = (dev, host)
        return out
