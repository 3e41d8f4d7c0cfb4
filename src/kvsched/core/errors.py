"""Typed errors of the core. Every error names the problem; none leaves state half-changed."""

from __future__ import annotations


class KVSchedError(Exception):
    """Base class of every error kvsched raises on purpose."""


class ConfigError(KVSchedError, ValueError):
    """A configuration value is invalid (names the field and the value)."""


class InvalidRequestError(KVSchedError, ValueError):
    """A request cannot be served as given (empty prompt, too long, bad sampling values...)."""


class DuplicateRequestError(KVSchedError, KeyError):
    """A request id is already known to the component."""


class UnknownRequestError(KVSchedError, KeyError):
    """An operation names a request id that is not (or no longer) known."""


class RequestTooLargeError(InvalidRequestError):
    """A request needs more KV blocks than the whole device pool holds."""


class UnsupportedFeatureError(KVSchedError, NotImplementedError):
    """A feature TensorRT-LLM's Python KVCacheManagerV2 also rejects (e.g. beam width > 1; PR #11939)."""


class SchedulerDeadlockError(KVSchedError, RuntimeError):
    """Generation requests exist but none can be scheduled or evicted because KV ran out."""


class KVTransferError(KVSchedError, RuntimeError):
    """Copying KV blocks between tiers failed (the storage backend raised). Nothing moved: the blocks stay
    where they were, every slot is accounted for. ``request_id`` names the request whose suspend or resume
    needed the copy (None for a copy no single request asked for)."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
