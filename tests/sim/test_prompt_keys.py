"""The simulator's per-segment prompt keys are the KV manager's own keys, and using them changes no
scheduling decision."""

from __future__ import annotations

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache import KVCacheManager, keys
from kvsched.core.kvcache.keys import chain_keys, pack_tokens, root_key
from kvsched.core.request import Request
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.prompt_keys import SegmentKeys
from kvsched.sim.simulator import Simulator, make_request
from kvsched.sim.synthetic import LengthDist, multi_turn_workload, synthetic_workload
from kvsched.sim.trace import load_mooncake
from kvsched.sim.workload import RequestSpec


def _want(req: Request, root: bytes, nfull: int, tpb: int) -> list[bytes]:
    return chain_keys(root, pack_tokens(req.token_slice(0, nfull * tpb)), tpb * 4)


@pytest.mark.parametrize("tpb", [16, 32, 48, 512, 1000])
def test_trace_prompts_get_the_keys_of_their_tokens(tpb):
    """512-token trace blocks, a partial last one; block sizes that divide 512 and ones that do not."""
    specs = {s.request_id: s for s in load_mooncake(limit=40)}
    source = SegmentKeys(specs, tpb)
    root = root_key(None, None)
    for spec in specs.values():
        req = make_request(spec, 0.0)
        for nfull in {(req.num_context_tokens - 1) // tpb, 0, 1, 17}:
            if nfull * tpb < req.num_context_tokens:
                assert source(req, root, nfull) == _want(req, root, nfull, tpb), (spec.request_id, nfull)
    assert (len(source) > 0) == (512 % tpb == 0)  # only whole-block segments are remembered


def test_odd_segments_scopes_and_recompute_contexts():
    tpb = 8
    spec = RequestSpec(7, 0.0, ((1 << 20, 16), (5, 0), (1 << 21, 24), (3 << 20, 13), (1 << 22, 32)), 20)
    source = SegmentKeys({7: spec}, tpb)
    req = make_request(spec, 0.0)
    for root in (root_key(None, None), root_key(3, None), root_key(None, 99)):
        nfull = (req.num_context_tokens - 1) // tpb
        assert source(req, root, nfull) == _want(req, root, nfull, tpb)
    # a preempted request's context is its prompt and the outputs it had: keyed from the tokens
    req.output_token_ids += list(range(300, 317))
    req.reset_for_recompute()
    nfull = (req.num_context_tokens - 1) // tpb
    assert nfull * tpb > spec.prompt_len
    assert source(req, root, nfull) == _want(req, root, nfull, tpb)


def test_unknown_or_vocabulary_mapped_requests_are_left_to_the_manager():
    spec = RequestSpec(1, 0.0, ((1 << 20, 64),), 4, vocab_size=1000)
    source = SegmentKeys({1: spec}, 16)
    root = root_key(None, None)
    assert source(make_request(spec, 0.0), root, 3) is None
    assert source(Request(2, list(range(40)), 4), root, 2) is None


def test_a_repeated_segment_is_not_hashed_again(monkeypatch):
    hashed = []
    real = keys.hash_chain

    def counting(parent, packed, block_bytes):
        hashed.append(len(packed) // block_bytes)
        return real(parent, packed, block_bytes)

    monkeypatch.setattr("kvsched.sim.prompt_keys.hash_chain", counting)
    a = RequestSpec(1, 0.0, ((1 << 20, 64), (2 << 20, 64), (3 << 20, 10)), 4)
    b = RequestSpec(2, 0.0, ((1 << 20, 64), (2 << 20, 64), (4 << 20, 64), (5 << 20, 3)), 4)
    source = SegmentKeys({1: a, 2: b}, 16)
    root = root_key(None, None)
    ra, rb = make_request(a, 0.0), make_request(b, 0.0)
    assert source(ra, root, 8) == _want(ra, root, 8, 16) and hashed == [4, 4]
    assert source(rb, root, 12) == _want(rb, root, 12, 16) and hashed == [4, 4, 4]  # only the new one
    assert source(rb, root_key(1, None), 12) == _want(rb, root_key(1, None), 12, 16)
    assert hashed == [4, 4, 4, 4, 4, 4]  # another scope: other keys


def test_the_segment_cache_rotates_two_generations():
    specs = {i: RequestSpec(i, 0.0, ((i << 20, 32), (9, 1)), 4) for i in range(1, 6)}
    source = SegmentKeys(specs, 16, size=2)
    root = root_key(None, None)
    for i in (1, 2, 3):
        source(make_request(specs[i], 0.0), root, 2)
    assert (len(source.recent), len(source.older)) == (0, 3)
    source(make_request(specs[1], 0.0), root, 2)  # from the older generation, back to recent
    assert (len(source.recent), len(source.older)) == (1, 3)


@pytest.mark.parametrize("bad", [dict(tokens_per_block=0), dict(tokens_per_block=16, size=0)])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="is invalid"):
        SegmentKeys({}, **bad)


def test_a_source_returning_the_wrong_count_is_a_config_error():
    m = KVCacheManager(CacheConfig(tokens_per_block=4, num_device_blocks=8, enable_block_reuse=True))
    m.set_prompt_keys(lambda req, root, nfull: [root] * (nfull + 1))
    with pytest.raises(
        ConfigError, match=r"^request 1: the prompt-keys source returned 3 keys for 2 whole blocks$"
    ):
        m.prepare_context(Request(1, list(range(9)), 2))


def _decisions(specs, keyed: bool, replicas: int = 1):
    cost = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
    cache = CacheConfig(
        tokens_per_block=16, num_device_blocks=80, num_host_blocks=40, enable_block_reuse=True
    )
    sim = Simulator(specs, cost, cache, record_decisions=True, num_replicas=replicas, max_batch_size=8,
                    max_num_tokens=256, chunk_unit_size=32)  # fmt: skip
    if not keyed:
        for rep in sim.replicas:
            rep.kv.set_prompt_keys(None)
    res = sim.run()
    if keyed:  # the simulator installed one source on every replica, and it keyed segments
        sources = {id(rep.kv._prompt_keys) for rep in sim.replicas}
        source = sim.replicas[0].kv._prompt_keys
        assert len(sources) == 1 and isinstance(source, SegmentKeys) and len(source) > 0
    return res.decisions, res.kv_stats


@pytest.mark.parametrize("workload", ["trace", "shared_prefix", "multi_turn"])
def test_segment_keys_change_no_decision(workload):
    if workload == "trace":
        specs = load_mooncake(limit=30)
        specs = [
            s.__class__(s.request_id, s.arrival_time * 5, s.segments, min(s.output_len, 40)) for s in specs
        ]
    elif workload == "shared_prefix":
        specs = synthetic_workload(
            30,
            40.0,
            LengthDist("uniform", 20, 300),
            LengthDist("uniform", 2, 30),
            shared_prefix_len=64,
            seed=3,
        )
    else:
        specs = multi_turn_workload(
            8,
            3,
            20.0,
            LengthDist("uniform", 20, 100),
            LengthDist("uniform", 5, 40),
            system_prompt_len=48,
            seed=2,
        )
    keyed, keyed_stats = _decisions(specs, True, replicas=2)
    plain, plain_stats = _decisions(specs, False, replicas=2)
    assert keyed == plain and len(keyed) > 10
    assert keyed_stats == plain_stats
    assert keyed_stats["reuse_hit_blocks_device"] + keyed_stats["reuse_hit_blocks_host"] > 0


def test_a_draft_cache_of_another_block_size_gets_keys_of_its_own_size():
    """The simulator keys each cache with a source of its own block size: a 32-token draft cache
    given the 16-token source's keys would match the wrong blocks."""
    from kvsched.sim.speculation import DrawnAcceptance, SimSpeculation

    specs = load_mooncake(limit=6)
    cost = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=4096, enable_block_reuse=True)
    draft = CacheConfig(tokens_per_block=32, num_device_blocks=4096, enable_block_reuse=True)
    spec = SimSpeculation(2, DrawnAcceptance(0.5), draft_cost=cost, draft_cache=draft)
    sim = Simulator(specs, cost, cache, speculation=spec, max_batch_size=8, max_num_tokens=8192)
    rep = sim.replicas[0]
    assert rep.draft is not None
    root = root_key(None, None)
    for kv, tpb in ((rep.kv, 16), (rep.draft.kv, 32)):
        source = kv._prompt_keys
        for spec_ in specs:
            req = make_request(spec_, 0.0)
            nfull = (req.num_context_tokens - 1) // tpb
            assert source(req, root, nfull) == _want(req, root, nfull, tpb), (tpb, spec_.request_id)
    res = sim.run()
    assert res.summary["requests"] == len(specs) and res.summary["rejected"] == 0
