"""core/lora_residency.py: the LRU of device-resident LoRA adapters shared by engine and simulator."""

from __future__ import annotations

import pytest

from kvsched.core.lora_residency import AdapterLRU


def _lru(*adapters: tuple[int, int]) -> AdapterLRU:
    lru = AdapterLRU()
    for lora_id, pages in adapters:
        lru.add(lora_id, pages)
    return lru


def test_touch_makes_an_adapter_the_most_recently_used():
    lru = _lru((1, 2), (2, 3), (3, 1))
    assert lru.touch(1) is True and list(lru.resident) == [2, 3, 1]
    assert lru.touch(9) is False and list(lru.resident) == [2, 3, 1]
    assert lru.pages == 6 and len(lru) == 3 and 3 in lru and 9 not in lru


def test_add_and_remove_keep_the_page_total():
    lru = _lru((1, 2), (2, 3))
    assert lru.remove(1) == 2 and lru.pages == 3 and list(lru.resident) == [2]
    with pytest.raises(ValueError, match="adapter 2 is already resident"):
        lru.add(2, 3)
    with pytest.raises(KeyError):
        lru.remove(1)


def test_evict_takes_the_least_recently_used_first_until_the_new_pages_fit():
    lru = _lru((1, 2), (2, 2), (3, 2), (4, 2))
    assert lru.evict(8, 0, (), lambda i: False) == ()  # already fits: nothing evicted
    assert list(lru.evict(8, 3, (), lambda i: False)) == [1, 2]  # 8 - 4 + 3 <= 8 after two
    assert list(lru.resident) == [3, 4] and lru.pages == 4


def test_evict_skips_kept_and_pinned_adapters_and_may_not_reach_the_budget():
    lru = _lru((1, 2), (2, 2), (3, 2), (4, 2))
    pinned = {2}
    assert list(lru.evict(4, 0, {1}, pinned.__contains__)) == [3, 4]
    assert list(lru.resident) == [1, 2] and lru.pages == 4
    assert list(lru.evict(1, 0, {1}, pinned.__contains__)) == []  # the rest is kept or pinned
    assert lru.pages == 4
