"""Block keys of a simulated prompt from its segments, remembered per segment.

A simulated prompt is a chain of segments (`workload.RequestSpec.segments`); a trace prompt is one
segment per 512-token Mooncake hash block. The KV manager keys a prompt block by block: SHA-256
chained over `tokens_per_block` tokens (`core/kvcache/keys.py`). A segment that starts on a block
boundary and covers whole blocks holds tokens fixed by its `(base, length)`, so the keys of its blocks
depend only on the key before it and on the segment: `SegmentKeys` remembers them per
`(parent key, base, length)`. A repeated trace block then costs one dict probe instead of packing its
512 tokens and probing the manager's key memo once per block; a new one is hashed once. The keys are
the manager's own (the same function of the same tokens; `tests/sim/test_prompt_keys.py` compares
them), so equal prefixes still get equal keys and different ones different keys, and every
scheduling decision is unchanged. What a segment cannot key (a partial block, outputs appended by a
recompute, a vocabulary-mapped workload) is keyed from the request's tokens, as the manager would.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.keys import chain_keys, hash_chain, pack_tokens
from kvsched.core.request import Request
from kvsched.sim.workload import SMALL_TOKENS, RequestSpec, segment_tag

#: every segment's tokens after its tag, packed once (a segment's bytes are a slice of this)
_SMALL_PACKED = pack_tokens(SMALL_TOKENS)
_TAG = struct.Struct("<i")


class SegmentKeys:
    """The manager's prompt-keys source (`KVCacheManager.set_prompt_keys`) for `specs`' requests.

    Remembers up to `2 * size` segments' keys (two generations, as `keys.KeyMemo`): with 512-token
    segments and 32-token blocks about 16 keys each, ~1.3 kB a segment. One instance may serve
    every replica of a simulation (keys are a pure function of the tokens).
    """

    __slots__ = ("_specs", "_tpb", "size", "recent", "older")

    def __init__(self, specs: Mapping[int, RequestSpec], tokens_per_block: int, size: int = 1 << 14) -> None:
        if not isinstance(tokens_per_block, int) or tokens_per_block < 1:
            raise ConfigError(f"tokens_per_block={tokens_per_block!r} is invalid: must be an integer >= 1")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"size={size!r} is invalid: must be an integer >= 1")
        self._specs = specs
        self._tpb = tokens_per_block
        self.size = size
        self.recent: dict[tuple[bytes, int, int], tuple[bytes, ...]] = {}
        self.older: dict[tuple[bytes, int, int], tuple[bytes, ...]] = {}

    def __call__(self, req: Request, root: bytes, nfull: int) -> list[bytes] | None:
        """Keys of the first `nfull` blocks of `req`'s context under `root`; None if the request
        is not one of the workload's or its tokens are mapped into a vocabulary."""
        spec = self._specs.get(req.request_id)
        if spec is None or spec.vocab_size is not None:
            return None
        tpb = self._tpb
        block_bytes = tpb * 4
        end = nfull * tpb
        recent, older = self.recent, self.older
        keys: list[bytes] = []
        parent = root
        pos = 0
        for base, n in spec.segments:
            if not n:
                continue  # an empty segment has no tokens (workload.RequestSpec.prompt_tokens)
            if n % tpb or pos + n > end:
                break  # a partial block, or past the looked-up blocks: keyed from the tokens below
            ck = (parent, base, n)
            run = recent.get(ck)
            if run is None:
                run = older.get(ck)
                if run is None:
                    packed = _TAG.pack(segment_tag(base)) + _SMALL_PACKED[4 : 4 * n]
                    run = tuple(hash_chain(parent, packed, block_bytes))
                recent[ck] = run
            keys += run
            parent = run[-1]
            pos += n
        if pos < end:
            keys += chain_keys(parent, pack_tokens(req.token_slice(pos, end)), block_bytes)
        if len(recent) > self.size:
            self.older = recent
            self.recent = {}
        return keys

    def __len__(self) -> int:
        return len(self.recent) + len(self.older)
