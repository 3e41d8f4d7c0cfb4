"""The request checks ``Engine.add_request`` makes, shared with the replicated server's front-end
(``serve/replicas/frontend.py``), so a bad request gets the same typed error from either."""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence

from kvsched.core.errors import InvalidRequestError, RequestTooLargeError


def check_priority(priority: object) -> int:
    """A request priority is an integer of any sign (numpy ints too, not bools); else InvalidRequestError."""
    if not isinstance(priority, numbers.Integral) or isinstance(priority, bool):
        raise InvalidRequestError(f"priority={priority!r} is invalid: must be an integer")
    return int(priority)


def check_cache_salt(cache_salt: object) -> None:
    """A cache salt is an int (bools and numpy ints are refused: it is hashed as is) or None."""
    if cache_salt is not None and type(cache_salt) is not int:
        raise InvalidRequestError(f"cache_salt must be an int or None, got {type(cache_salt).__name__}")


def check_prompt(
    token_ids: Sequence[int],
    max_tokens: int,
    *,
    vocab_size: int,
    max_model_len: int,
    tokens_per_block: int,
    num_device_blocks: int,
    request_id: Hashable | None = None,
) -> None:
    """A non-empty prompt of in-vocabulary ids whose prompt + max_tokens fits the context and the
    device KV pool; a ``request_id`` is named in each message (the engine's; the front-end has none yet)."""
    if not token_ids:
        raise InvalidRequestError(f"{_where(request_id)}the prompt is empty")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        raise InvalidRequestError(f"{_where(request_id)}prompt token ids must be in [0, {vocab_size})")
    total = len(token_ids) + max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"{_where(request_id)}prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"max_model_len={max_model_len}"
        )
    blocks = -(-(total - 1) // tokens_per_block)  # the last token's KV is never written
    if blocks > num_device_blocks:
        raise RequestTooLargeError(
            f"{_where(request_id)}needs {blocks} KV blocks of {tokens_per_block} tokens, the device pool has "
            f"{num_device_blocks}"
        )


def _where(request_id: Hashable | None) -> str:
    """The message prefix naming the request (built only when a check fails)."""
    return "" if request_id is None else f"request {request_id!r}: "
