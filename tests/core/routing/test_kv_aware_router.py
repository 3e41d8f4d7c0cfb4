"""The routers' choices: prefix against load, overload, sessions, ties, errors; keys equal the manager's."""

import pytest

from kvc_helpers import prefill
from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.kvcache.types import KVEvent, Tier
from kvsched.core.request import Request
from kvsched.core.routing import (
    ROUTER_KINDS,
    KVAwareRouter,
    ReplicaLoad,
    Router,
    least_loaded,
    make_router,
    normalize_router_kind,
    prompt_keys,
)

BS = 4
PROMPT = list(range(1000, 1065))  # 64 looked-up tokens: 16 blocks


def kv_router(**kw):
    """A KV-aware router without predictions: its choices follow the events alone."""
    return KVAwareRouter(BS, **{"predict_ttl": 0, **kw})


def loads(*queues, kv=0.0):
    return {i: ReplicaLoad(num_running=q, num_waiting=0, kv_usage=kv) for i, q in enumerate(queues)}


def cache_on(router, replica, tokens, tier=Tier.DEVICE, salt=None, lora_id=None):
    keys = prompt_keys(tokens, BS, salt=salt, lora_id=lora_id)
    router.on_events(replica, [KVEvent("stored", k, tier) for k in keys])


def test_every_kind_builds_a_router_and_cli_spellings_are_accepted():
    for kind in ROUTER_KINDS:
        assert isinstance(make_router(kind, block_size=BS), Router)
    assert isinstance(make_router("kv-aware", block_size=BS), KVAwareRouter)
    assert normalize_router_kind("Round-Robin") == "round_robin"
    with pytest.raises(ConfigError, match="random"):
        make_router("random", block_size=BS)
    with pytest.raises(ConfigError, match="block_size"):
        make_router("kv_aware", block_size=0)
    with pytest.raises(ConfigError, match="no options"):
        make_router("round_robin", block_size=BS, host_hit_weight=0.5)
    with pytest.raises(ConfigError, match="host_hit_weight"):
        KVAwareRouter(BS, host_hit_weight=2.0)
    with pytest.raises(ConfigError, match="'kv_aware'.*hit_weight"):
        make_router("kv_aware", block_size=BS, hit_weight=1.0)
    with pytest.raises(ConfigError, match="max_sessions"):
        make_router("sticky", block_size=BS, max_sessions=0)


def test_session_table_keeps_the_most_recent_sessions():
    r = make_router("sticky", block_size=BS, max_sessions=2)
    assert r.choose([], loads(0, 1), session="a") == 0
    assert r.choose([], loads(1, 0), session="b") == 1
    assert r.choose([], loads(1, 0), session="a") == 0  # "a" used again: "b" is now the oldest
    assert r.choose([], loads(0, 1), session="c") == 0  # a third session drops "b"
    assert r.choose([], loads(0, 1), session="b") == 0  # "b" forgotten: least-loaded again
    assert r.choose([], loads(1, 0), session="c") == 0  # "c" kept (and "a" dropped for "b")
    assert r.choose([], loads(1, 0), session="a") == 1


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_empty_loads_is_a_clear_error(kind):
    with pytest.raises(ConfigError, match="no live replica"):
        make_router(kind, block_size=BS).choose(PROMPT, {})


def test_least_loaded_of_no_replica_is_an_error_not_a_sentinel_id():
    with pytest.raises(ConfigError, match="no live replica"):
        least_loaded({})


def test_round_robin_cycles_over_live_replicas_only():
    r = make_router("round_robin", block_size=BS)
    assert [r.choose([], loads(0, 0, 0)) for _ in range(4)] == [0, 1, 2, 0]
    live = {0: ReplicaLoad(), 2: ReplicaLoad()}  # replica 1 died
    assert [r.choose([], live) for _ in range(3)] == [2, 0, 2]


def test_least_loaded_counts_running_and_waiting_and_ties_to_lowest_id():
    r = make_router("least_loaded", block_size=BS)
    assert r.choose([], {0: ReplicaLoad(2, 1), 1: ReplicaLoad(1, 1), 2: ReplicaLoad(0, 2)}) == 1
    assert r.choose([], loads(3, 3, 3)) == 0


def test_sticky_follows_the_session_until_its_replica_is_gone():
    r = make_router("sticky", block_size=BS)
    assert r.choose([], loads(1, 0), session="a") == 1
    assert r.choose([], loads(0, 9), session="a") == 1  # stays however loaded
    r.remove_replica(1)
    assert r.choose([], {0: ReplicaLoad()}, session="a") == 0


def test_prefix_wins_over_slight_load():
    r = kv_router()
    cache_on(r, 1, PROMPT)
    assert r.choose(PROMPT, loads(0, 2)) == 1
    assert r.choose(PROMPT, {0: ReplicaLoad(), 1: ReplicaLoad(kv_usage=0.02)}) == 1


def test_overload_beats_prefix():
    r = kv_router(running_weight=0.0, balance_abs_threshold=4, balance_rel_threshold=1.5)
    cache_on(r, 1, PROMPT)
    assert r.choose(PROMPT, loads(1, 5)) == 1  # 4 more: not yet overloaded (and no load term)
    assert r.choose(PROMPT, loads(1, 6)) == 0


def test_load_term_beats_a_short_prefix():
    r = kv_router(waiting_weight=100.0)
    cache_on(r, 1, PROMPT[:9])  # 2 blocks = 8 tokens cached on replica 1
    busy = {0: ReplicaLoad(), 1: ReplicaLoad(num_waiting=1)}
    assert r.choose(PROMPT, busy) == 0


def test_device_hits_beat_host_hits_by_the_host_weight():
    r = kv_router(host_hit_weight=0.5)
    cache_on(r, 0, PROMPT, tier=Tier.HOST)
    cache_on(r, 1, PROMPT[:41])  # 10 blocks on device vs 16 on host: 40 vs 64 * 0.5 = 32 saved
    assert r.choose(PROMPT, loads(0, 0)) == 1
    r0 = kv_router(host_hit_weight=0.0)
    cache_on(r0, 0, PROMPT, tier=Tier.HOST)
    cache_on(r0, 1, PROMPT[:41])
    assert r0.choose(PROMPT, loads(0, 0)) == 0


def test_ties_and_unknown_prefixes_go_least_loaded():
    r = kv_router()
    assert r.choose(PROMPT, loads(3, 1, 2)) == 1  # nothing cached anywhere
    cache_on(r, 0, PROMPT)
    cache_on(r, 2, PROMPT)
    assert r.choose(PROMPT, loads(2, 5, 2)) == 0  # equal hits, equal load: lowest id
    assert r.choose(PROMPT, {0: ReplicaLoad(3), 1: ReplicaLoad(0), 2: ReplicaLoad(2)}) == 2


def test_salt_and_adapter_scope_the_match():
    r = kv_router()
    cache_on(r, 1, PROMPT, salt=7)
    assert r.choose(PROMPT, loads(0, 0)) == 0  # unsalted lookup: no hit, least-loaded
    assert r.choose(PROMPT, loads(0, 0), salt=7) == 1
    assert r.choose(PROMPT, loads(0, 0), salt=7, lora_id=1) == 0


def test_session_stays_unless_overloaded_and_removed_replicas_are_forgotten():
    r = kv_router(balance_abs_threshold=2)
    assert r.choose(PROMPT, loads(1, 0), session="s") == 1
    cache_on(r, 0, PROMPT)  # the prefix elsewhere does not move a session
    assert r.choose(PROMPT, loads(0, 2), session="s") == 1
    assert r.choose(PROMPT, loads(0, 3), session="s") == 0  # overloaded: the session moves...
    assert r.choose(PROMPT, loads(0, 0), session="s") == 0  # ...and stays at its new replica
    r.remove_replica(0)
    assert r.index.match(prompt_keys(PROMPT, BS)) == {}
    assert r.choose(PROMPT, {1: ReplicaLoad(), 2: ReplicaLoad()}, session="s") == 1


def test_a_burst_sharing_a_prefix_follows_the_first_request_until_the_prediction_expires():
    r = KVAwareRouter(BS, predict_ttl=3)
    assert r.choose(PROMPT, loads(0, 0)) == 0  # unknown prefix: least-loaded; predicted on 0
    assert r.choose(PROMPT, loads(1, 0)) == 0  # its events have not come yet: follows the prediction
    assert r.choose(list(range(5000, 5065)), loads(1, 0)) == 1  # another prompt
    assert r.choose(list(range(6000, 6065)), loads(1, 0)) == 1  # the first prediction expires here
    assert r.choose(PROMPT, loads(1, 0)) == 1
    r.on_events(1, [KVEvent("removed", k, Tier.DEVICE) for k in prompt_keys(PROMPT, BS)])
    assert r.index.match(prompt_keys(PROMPT, BS), predicted=True) == {}  # an eviction ends a prediction


def _prefill(m, rid, tokens, **kw):
    return prefill(m, Request(rid, tokens, 2, **kw))


@pytest.mark.parametrize("salt, lora_id", [(None, None), (5, None), (None, 3), (9, 2)])
def test_router_keys_equal_a_real_managers_event_hashes(salt, lora_id):
    cfg = CacheConfig(
        tokens_per_block=BS, num_device_blocks=64, enable_block_reuse=True, enable_kv_events=True
    )
    m = KVCacheManager(cfg)
    _prefill(m, 1, PROMPT, cache_salt=salt, lora_id=lora_id)
    events = m.drain_events()
    keys = prompt_keys(PROMPT, BS, salt=salt, lora_id=lora_id)
    assert [e.block_hash for e in events if e.kind == "stored"] == keys
    r = kv_router()
    r.on_events(0, events)
    assert r.index.match(keys) == {0: (len(keys), 0)}
    # the manager's own lookup of a second request agrees with the router's prediction
    follow = PROMPT[:-1] + [1, 2, 3, 4, 5]
    predicted = r.index.match(prompt_keys(follow, BS, salt=salt, lora_id=lora_id))[0][0] * BS
    req = Request(2, follow, 2, cache_salt=salt, lora_id=lora_id)
    assert m.prepare_context(req)
    assert predicted == req.context_current_position == 64
