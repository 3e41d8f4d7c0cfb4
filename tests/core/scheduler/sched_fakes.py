"""A small, exact fake of the KV manager's scheduling API (block accounting, tiers, call log)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvsched.core.errors import UnknownRequestError
from kvsched.core.request import Request, RequestState


@dataclass(slots=True)
class _Cache:
    capacity: int = 0
    history: int = 0
    active: bool = True


@dataclass
class FakeKV:
    """Device/host block pools; a request holds ceil(capacity / tpb) blocks on its current tier."""

    num_device_blocks: int = 1000
    num_host_blocks: int | None = None  # None = unlimited host tier; 0 = no host tier
    tokens_per_block: int = 4
    reuse: dict[int, int] = field(default_factory=dict)  # request id -> tokens reused at creation
    calls: list[tuple[str, int]] = field(default_factory=list)
    caches: dict[int, _Cache] = field(default_factory=dict)
    fail_resize: set[int] = field(default_factory=set)  # request ids whose resize always fails

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    @property
    def used_device_blocks(self) -> int:
        return sum(self._blocks(c.capacity) for c in self.caches.values() if c.active)

    @property
    def used_host_blocks(self) -> int:
        return sum(self._blocks(c.capacity) for c in self.caches.values() if not c.active)

    @property
    def num_free_device_blocks(self) -> int:
        return self.num_device_blocks - self.used_device_blocks

    def _fits_device(self, extra_blocks: int) -> bool:
        return self.used_device_blocks + extra_blocks <= self.num_device_blocks

    def _resume(self, c: _Cache) -> bool:
        if c.active:
            return True
        if not self._fits_device(self._blocks(c.capacity)):
            return False
        c.active = True
        return True

    def _grow(self, rid: int, c: _Cache, target: int) -> bool:
        if rid in self.fail_resize:
            return False
        if target <= c.capacity:
            return True
        if not self._fits_device(self._blocks(target) - self._blocks(c.capacity)):
            return False
        c.capacity = target
        return True

    # -- scheduling API ----------------------------------------------------------------------------
    def prepare_context(self, req: Request) -> bool:
        self.calls.append(("prepare", req.request_id))
        c = self.caches.get(req.request_id)
        if c is None:
            reused = self.reuse.get(req.request_id, 0)
            c = self.caches[req.request_id] = _Cache(active=False)
            if reused:
                c.capacity = c.history = reused
                req.context_current_position = reused
                req.num_reused_tokens = reused
        return self._resume(c)

    def resize_context(self, req: Request, num_tokens: int) -> bool:
        self.calls.append(("resize", req.request_id))
        c = self.caches.get(req.request_id)
        if c is None:
            return False
        ok = c.active and self._grow(req.request_id, c, req.context_current_position + num_tokens)
        if not ok and req.is_first_context_chunk:
            self.suspend_request(req)
        return ok

    def try_allocate_generation(self, req: Request) -> bool:
        self.calls.append(("alloc", req.request_id))
        c = self.caches.get(req.request_id)
        if c is None or not self._resume(c):
            return False
        return self._grow(req.request_id, c, c.capacity + 1 + len(req.draft_tokens))

    def suspend_request(self, req: Request) -> None:
        self.calls.append(("suspend", req.request_id))
        c = self.caches.get(req.request_id)
        if c is None or not c.active:
            return
        if self.num_host_blocks is not None and (
            self.used_host_blocks + self._blocks(c.capacity) > self.num_host_blocks
        ):
            return  # no room on the host tier: stays on the device
        c.active = False

    def can_suspend(self, req: Request) -> bool:
        c = self.caches.get(req.request_id)
        if c is None or not c.active:
            return False
        return self.num_host_blocks is None or (
            self.used_host_blocks + self._blocks(c.capacity) <= self.num_host_blocks
        )

    def is_request_active(self, request_id: int) -> bool:
        c = self.caches.get(request_id)
        return c is not None and c.active

    # -- executor API ------------------------------------------------------------------------------
    def advance(self, req: Request, num_tokens: int) -> None:
        c = self.caches[req.request_id]
        assert c.active, f"advance on suspended request {req.request_id}"
        c.history += num_tokens
        assert c.history <= c.capacity, (req.request_id, c.history, c.capacity)

    def free_request(self, req: Request) -> None:
        self.calls.append(("free", req.request_id))
        if self.caches.pop(req.request_id, None) is None:
            raise UnknownRequestError(req.request_id)

    def revert(self, req: Request, capacity: int) -> None:
        self.calls.append(("revert", req.request_id))
        c = self.caches[req.request_id]
        c.capacity = max(c.history, capacity)

    def capacity(self, req: Request) -> int:
        return self.caches[req.request_id].capacity

    def history(self, req: Request) -> int:
        return self.caches[req.request_id].history


@dataclass
class FakePeft:
    max_device_pages: int
    pages: dict[int, int] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    acquired: list[int] = field(default_factory=list)

    def num_pages(self, req: Request) -> int:
        return 0 if req.lora_id is None else self.pages.get(req.lora_id, 1)

    def release(self, req: Request) -> None:
        self.released.append(req.request_id)

    def acquire(self, req: Request) -> None:
        self.acquired.append(req.request_id)


def ctx(rid: int, prompt: int = 8, max_new: int = 4, **kw) -> Request:
    return Request(rid, list(range(1, prompt + 1)), max_new, arrival_time=float(rid), **kw)


def running(kv: FakeKV, rid: int, prompt: int = 8, out: int = 1, max_new: int = 100, **kw) -> Request:
    """A request already in generation whose KV (prompt + out - 1 tokens) lives on the device."""
    req = ctx(rid, prompt, max_new, **kw)
    req.context_current_position = prompt
    req.output_token_ids = [7] * out
    req.state = RequestState.GENERATION_IN_PROGRESS
    n = prompt + out - 1
    kv.caches[rid] = _Cache(capacity=n, history=n, active=True)
    return req


def started_ctx(kv: FakeKV, rid: int, prompt: int = 16, done: int = 4, **kw) -> Request:
    """A context past its first chunk (evictable)."""
    req = ctx(rid, prompt, **kw)
    req.context_current_position = done
    kv.caches[rid] = _Cache(capacity=done, history=done, active=True)
    return req
