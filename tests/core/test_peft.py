"""LoRA page accounting and adapter ownership."""

from __future__ import annotations

import pytest

from kvsched.core.errors import ConfigError, InvalidRequestError
from kvsched.core.peft import PeftCache
from kvsched.core.request import Request


def req(rid, lora):
    return Request(rid, [1, 2], 2, lora_id=lora)


def test_pages_per_adapter_from_a_mapping_or_a_single_size():
    cache = PeftCache(8, {1: 2, 2: 3})
    assert cache.num_pages(req(0, 1)) == 2 and cache.num_pages(req(1, 2)) == 3
    assert cache.num_pages(req(2, None)) == 0
    with pytest.raises(InvalidRequestError, match="adapter 9"):
        cache.num_pages(req(3, 9))
    assert PeftCache(8, 4).num_pages(req(4, 77)) == 4


def test_ownership_pins_an_adapter_until_every_owner_released_it():
    cache = PeftCache(8, {1: 2})
    a, b = req(0, 1), req(1, 1)
    cache.acquire(a)
    cache.acquire(b)
    assert cache.owners(1) == {0, 1} and cache.is_pinned(1) and cache.pinned_pages == 2
    cache.release(a)
    assert cache.is_pinned(1)
    cache.release(b)
    cache.release(b)
    assert not cache.is_pinned(1) and cache.pinned_pages == 0
    cache.acquire(req(2, None))
    assert cache.pinned_pages == 0


@pytest.mark.parametrize("args", [(-1, 2), (4, 0), (4, {1: 0}), ("8", 2)])
def test_bad_configuration_is_a_config_error(args):
    with pytest.raises(ConfigError):
        PeftCache(*args)
