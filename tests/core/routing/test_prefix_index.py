"""PrefixIndex against streams of KV events: stored, removed, tier moves, a replica gone, gaps."""

import random

import pytest

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.types import KVEvent, Tier
from kvsched.core.routing import PrefixIndex, prompt_keys

D, H = Tier.DEVICE, Tier.HOST
KEYS = prompt_keys(list(range(33)), 4)  # 32 tokens before the last: 8 chained blocks


def stored(keys, tier=D):
    return [KVEvent("stored", k, tier, keys[i - 1] if i else None) for i, k in enumerate(keys)]


def removed(keys, tier=D):
    return [KVEvent("removed", k, tier) for k in keys]


def test_prompt_keys_cover_whole_blocks_of_all_but_the_last_token():
    assert len(KEYS) == 8
    assert prompt_keys(list(range(32)), 4) == KEYS[:7]  # 31 looked-up tokens: 7 whole blocks
    assert prompt_keys([1], 4) == []
    assert prompt_keys(list(range(33)), 4, salt=1) != KEYS
    assert prompt_keys(list(range(33)), 4, lora_id=1) != prompt_keys(list(range(33)), 4, salt=1)
    with pytest.raises(ConfigError, match="block_size"):
        prompt_keys([1, 2], 0)


def test_stored_blocks_match_per_replica_and_tier():
    idx = PrefixIndex()
    idx.apply(0, stored(KEYS[:5]))
    idx.apply(1, stored(KEYS[:2]))
    idx.apply(1, stored(KEYS[2:4], H))
    assert idx.match(KEYS) == {0: (5, 0), 1: (2, 2)}
    assert idx.match(KEYS[:1]) == {0: (1, 0), 1: (1, 0)}
    assert idx.match(prompt_keys(list(range(100, 133)), 4)) == {}
    assert idx.match([]) == {}


def test_removed_blocks_shorten_the_chain_and_unknown_removals_are_ignored():
    idx = PrefixIndex()
    idx.apply(0, stored(KEYS))
    idx.apply(0, removed(KEYS[6:]))
    assert idx.match(KEYS) == {0: (6, 0)}
    idx.apply(0, removed(KEYS[6:]))  # again: unknown now, ignored
    idx.apply(0, removed(KEYS[:3], H))  # wrong tier: the device copies stay
    assert idx.match(KEYS) == {0: (6, 0)}
    idx.apply(0, removed(KEYS))
    assert idx.match(KEYS) == {} and len(idx) == 0 and idx.num_blocks(0) == 0


def test_a_tier_move_is_removed_then_stored_and_counts_on_the_new_tier():
    idx = PrefixIndex()
    idx.apply(0, stored(KEYS[:4]))
    move = []
    for k in KEYS[2:4]:
        move += [KVEvent("removed", k, D), KVEvent("stored", k, H)]
    idx.apply(0, move)
    assert idx.match(KEYS) == {0: (2, 2)}
    idx.apply(0, [KVEvent("removed", KEYS[2], H), KVEvent("stored", KEYS[2], D)])  # onboarded again
    assert idx.match(KEYS) == {0: (3, 1)}


def test_chain_stops_at_the_first_block_a_replica_lacks():
    idx = PrefixIndex()
    idx.apply(0, stored(KEYS[:2] + KEYS[3:]))  # a gap at block 2
    idx.apply(1, stored(KEYS[1:]))  # lacks the first block: no match at all
    assert idx.match(KEYS) == {0: (2, 0)}


def test_a_replica_gone_is_dropped_and_others_keep_their_blocks():
    idx = PrefixIndex()
    idx.apply(0, stored(KEYS))
    idx.apply(1, stored(KEYS[:3]))
    idx.remove_replica(0)
    assert idx.match(KEYS) == {1: (3, 0)}
    assert idx.replicas() == [1] and len(idx) == 3
    idx.remove_replica(0)  # twice: nothing left to drop
    idx.remove_replica(1)
    assert len(idx) == 0 and idx.match(KEYS) == {}


def test_predictions_count_only_when_asked_expire_and_give_way_to_events():
    idx = PrefixIndex()
    idx.predict(0, KEYS[:4], ttl=2)
    assert idx.match(KEYS) == {}
    assert idx.match(KEYS, predicted=True) == {0: (4, 0)}
    assert idx.num_blocks(0) == 0 and idx.num_blocks(0, predicted=True) == 4
    idx.apply(0, stored(KEYS[:2], H))  # confirmed (on the host) for two blocks
    assert idx.match(KEYS, predicted=True) == {0: (2, 2)}
    idx.predict(1, KEYS[:1], ttl=2)
    idx.predict(1, KEYS[:1], ttl=2)  # the third call: replica 0's prediction expires
    assert idx.match(KEYS, predicted=True) == {0: (0, 2), 1: (1, 0)}
    idx.predict(1, [], ttl=2)
    assert idx.match(KEYS, predicted=True) == {0: (0, 2)} and len(idx) == 2
    idx.predict(0, KEYS[:3], ttl=0)  # ttl 0: predicts nothing
    assert idx.match(KEYS, predicted=True) == {0: (0, 2)}


def test_unknown_event_kind_is_a_clear_error():
    with pytest.raises(ConfigError, match="'moved'"):
        PrefixIndex().apply(0, [KVEvent("moved", KEYS[0], D)])


@pytest.mark.parametrize("seed", range(5))
def test_random_event_streams_match_a_brute_force_model(seed):
    """Random stored / removed / tier moves / replicas leaving, checked after every batch against a
    plain model: per replica, the set of tiers each block is on."""
    rng = random.Random(seed)
    idx = PrefixIndex()
    model: dict[int, dict[bytes, set]] = {}
    for _ in range(200):
        rep = rng.randrange(3)
        if rng.random() < 0.03:
            idx.remove_replica(rep)
            model.pop(rep, None)
            continue
        batch = []
        for _ in range(rng.randrange(1, 6)):
            key = KEYS[rng.randrange(len(KEYS))]
            tier = rng.choice((D, H))
            kind = rng.choice(("stored", "removed"))
            batch.append(KVEvent(kind, key, tier))
            tiers = model.setdefault(rep, {}).setdefault(key, set())
            if kind == "stored":
                tiers.add(tier)
            else:
                tiers.discard(tier)
        idx.apply(rep, batch)
        for start in (0, 0, rng.randrange(len(KEYS))):
            keys = KEYS[start:]
            want = {}
            for r, blocks in model.items():
                dev = host = 0
                for k in keys:
                    tiers = blocks.get(k)
                    if not tiers:
                        break
                    if D in tiers:
                        dev += 1
                    else:
                        host += 1
                if dev or host:
                    want[r] = (dev, host)
            assert idx.match(keys) == want
