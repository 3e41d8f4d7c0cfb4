"""Random create / grow / commit / suspend / resume / free / reuse sequences against real tensors.

After every step: no block leaked or owned twice, free + used + cached == total per tier, and every
active request's block table points at its own data. The KV written at position p is a hash of the
tokens 0..p, so a shared (reused) block holds exactly what the reader would have computed itself.
"""

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hypothesis_budget import mutation_budget
from kvsched.core.config import CacheConfig
from kvsched.core.errors import RequestTooLargeError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import Request, RequestState
from kvsched.engine.kv_storage import TensorKVStorage

MOD = 1 << 40


def prefix_values(tokens: list[int]) -> list[float]:
    out, h = [], 7
    for t in tokens:
        h = (h * 1000003 + t + 1) % MOD
        out.append(float(h))
    return out


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(
        tpb=st.integers(1, 4),
        device=st.integers(10, 32),
        host=st.integers(0, 24),
        reuse=st.sampled_from([True, True, False]),
        prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=2, max_size=4),
        data=st.data(),
    )
    def setup(self, tpb, device, host, reuse, prompts, data):
        """Pool sizes are drawn in tokens (small blocks must not mean a useless pool); a few
        prefilled requests give every rule something to act on."""
        device, host = max(3, device // tpb), host // tpb
        self.cfg = CacheConfig(
            tokens_per_block=tpb, num_device_blocks=device, num_host_blocks=host, enable_block_reuse=reuse
        )
        self.storage = TensorKVStorage(
            self.cfg, num_layers=2, num_kv_heads=1, head_dim=1, dtype=torch.float64
        )
        self.m = KVCacheManager(self.cfg, self.storage)
        self.reqs: dict[int, Request] = {}
        self.next_id = 0
        for prompt in prompts:
            self._admit(prompt, 6, True, data)

    # -- helpers -------------------------------------------------------------------------------
    def _write(self, r: Request, start: int, end: int, tokens: list[int]) -> None:
        """What a forward pass does: KV of positions [start, end) computed from ``tokens``."""
        if end <= start:
            return
        tpb = self.cfg.tokens_per_block
        table = torch.tensor(self.m.block_table(r))
        pos = torch.arange(start, end)
        vals = torch.tensor(prefix_values(tokens)[start:end], dtype=torch.float64)
        for layer, kv in enumerate(self.storage.device_kv):
            kv[table[pos // tpb], 0, pos % tpb, 0, 0] = vals + layer
            kv[table[pos // tpb], 1, pos % tpb, 0, 0] = -vals - layer

    def _check_data(self, r: Request) -> None:
        n = self.m.history(r)
        if n == 0:
            return
        tpb = self.cfg.tokens_per_block
        table = torch.tensor(self.m.block_table(r))
        pos = torch.arange(n)
        want = torch.tensor(prefix_values(r.token_slice(0, n)), dtype=torch.float64)
        for layer, kv in enumerate(self.storage.device_kv):
            assert torch.equal(kv[table[pos // tpb], 0, pos % tpb, 0, 0], want + layer), r
            assert torch.equal(kv[table[pos // tpb], 1, pos % tpb, 0, 0], -want - layer), r

    def _pick(self, data, pred):
        ids = sorted(rid for rid, r in self.reqs.items() if pred(r))
        if not ids:
            return None
        return self.reqs[data.draw(st.sampled_from(ids))]

    # -- rules ---------------------------------------------------------------------------------
    @rule(
        prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=1, max_size=3),
        max_new=st.integers(1, 6),
        share=st.booleans(),
        run=st.booleans(),
        data=st.data(),
    )
    def create(self, prompts, max_new, share, run, data):
        for prompt in prompts:
            if share and self.reqs:
                other = self._pick(data, lambda r: self.m.history(r) > 0) or self._pick(data, lambda r: True)
                prompt = other.token_slice(0, min(other.num_tokens, 10)) + prompt[:2]
            self._admit(prompt, max_new, run, data)

    def _admit(self, prompt: list[int], max_new: int, run: bool, data) -> None:
        r = Request(self.next_id, prompt, max_new)
        self.next_id += 1
        try:
            ok = self.m.prepare_context(r)
        except RequestTooLargeError:
            assert not self.m.has_request(r.request_id)
            return
        self.reqs[r.request_id] = r
        assert r.context_current_position % self.cfg.tokens_per_block == 0
        assert r.context_current_position < r.num_context_tokens
        if ok:
            assert self.m.history(r) == r.context_current_position
            self._check_data(r)
            if run:
                self._prefill(r, r.context_remaining_length, data)

    @rule(chunk=st.integers(1, 8), data=st.data())
    def prefill(self, chunk, data):
        r = self._pick(data, lambda r: r.state == RequestState.CONTEXT_INIT)
        if r is not None and self.m.prepare_context(r):
            self._prefill(r, chunk, data)

    def _prefill(self, r: Request, chunk: int, data) -> None:
        chunk = min(chunk, r.context_remaining_length)
        if not self.m.resize_context(r, chunk):
            return
        start = r.context_current_position
        self._write(r, start, start + chunk, r.token_slice(0, r.num_tokens))
        self.m.advance(r, chunk)
        r.context_current_position += chunk
        if r.context_remaining_length == 0:
            r.state = RequestState.GENERATION_IN_PROGRESS
            r.output_token_ids.append(data.draw(st.integers(0, 2)))
            self._finish_if_done(r)

    @rule(
        drafts=st.lists(st.integers(0, 2), max_size=3),
        accepted=st.integers(0, 3),
        bonus=st.integers(0, 2),
        data=st.data(),
    )
    def decode(self, drafts, accepted, bonus, data):
        r = self._pick(data, lambda r: r.state == RequestState.GENERATION_IN_PROGRESS)
        if r is None:
            return
        remaining = r.max_new_tokens - len(r.output_token_ids)
        drafts = drafts[: max(0, remaining - 1)]
        r.draft_tokens = drafts
        try:
            ok = self.m.try_allocate_generation(r)
        except RequestTooLargeError:
            ok = False
        if not ok:
            r.draft_tokens = []
            return
        accepted = min(accepted, len(drafts))
        start = self.m.history(r)
        written = r.token_slice(0, r.num_tokens) + drafts  # rejected drafts get (wrong) KV too
        self._write(r, start, start + 1 + len(drafts), written)
        self.m.advance(r, 1 + accepted)
        r.output_token_ids += drafts[:accepted] + [bonus]
        r.draft_tokens = []
        self._finish_if_done(r)

    def _finish_if_done(self, r: Request) -> None:
        if len(r.output_token_ids) >= r.max_new_tokens:
            self.m.free_request(r)
            del self.reqs[r.request_id]

    @rule(data=st.data())
    def suspend(self, data):
        r = self._pick(data, lambda r: self.m.is_request_active(r.request_id) and self.m.history(r) > 0)
        if r is not None:
            self.m.suspend_request(r)
            assert not self.m.is_request_active(r.request_id)

    @rule(data=st.data(), extra=st.integers(0, 2))
    def fork(self, data, extra):
        """A new request continuing an active one's sequence (a prefix hit when reuse is on)."""
        other = self._pick(data, lambda r: self.m.is_request_active(r.request_id) and self.m.committed(r) > 0)
        if other is not None:
            self._admit(other.token_slice(0, other.num_tokens) + [extra], 4, True, data)

    @rule(data=st.data())
    def suspend_sharer(self, data):
        """Suspend a request that shares device blocks with another active request."""
        tables = {
            rid: set(self.m.block_table(r)) for rid, r in self.reqs.items() if self.m.is_request_active(rid)
        }
        sharers = [rid for rid, t in tables.items() if any(t & u for o, u in tables.items() if o != rid)]
        if sharers:
            r = self.reqs[data.draw(st.sampled_from(sorted(sharers)))]
            self.m.suspend_request(r)

    @rule(data=st.data())
    def resume(self, data):
        r = self._pick(data, lambda r: not self.m.is_request_active(r.request_id))
        if r is None:
            return
        if r.state == RequestState.CONTEXT_INIT:
            self.m.prepare_context(r)
        else:
            self.m.try_allocate_generation(r)
            if self.m.is_request_active(r.request_id):
                self.m.revert(r, 0)

    @precondition(lambda self: len(self.reqs) > 2)
    @rule(data=st.data())
    def free(self, data):
        r = self._pick(data, lambda r: True)
        if r is not None:
            self.m.free_request(r)
            del self.reqs[r.request_id]
            assert not self.m.has_request(r.request_id)

    @precondition(lambda self: hasattr(self, "m"))
    @invariant()
    def consistent(self):
        check_invariants(self.m)
        s = self.m.stats()
        assert s.free_device_blocks + s.used_device_blocks + s.cached_device_blocks == s.num_device_blocks
        assert s.free_host_blocks + s.used_host_blocks + s.cached_host_blocks == s.num_host_blocks
        for r in self.reqs.values():
            if self.m.is_request_active(r.request_id):
                self._check_data(r)

    def teardown(self):
        if hasattr(self, "m"):
            for r in list(self.reqs.values()):
                self.m.free_request(r)
            check_invariants(self.m)
            s = self.m.stats()
            assert s.used_device_blocks == s.used_host_blocks == 0


KVCacheMachine.TestCase.settings = settings(
    max_examples=mutation_budget(150),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kvcache_state_machine = KVCacheMachine.TestCase
