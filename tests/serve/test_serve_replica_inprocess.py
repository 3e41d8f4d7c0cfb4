"""The replica and the front-end checks without Ray: ``EngineReplica`` over an in-process engine, and
``check_request`` raising what ``Engine.add_request`` raises for the same bad input."""

from __future__ import annotations

import json

import pytest
from tiny_engine import ENGINE_KW, TINY, tiny_engine

from kvsched.core.errors import InvalidRequestError, RequestTooLargeError
from kvsched.core.request import SamplingParams
from kvsched.core.routing import prompt_keys
from kvsched.serve.metrics import EngineSnapshot
from kvsched.serve.replicas.frontend import check_request
from kvsched.serve.replicas.replica import EngineReplica
from kvsched.serve.replicas.state import ReplicaState, totals

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def replica() -> EngineReplica:
    return EngineReplica(engine=tiny_engine(num_device_blocks=8, max_model_len=256))


BAD = [  # token ids, sampling params, priority, cache salt, error
    ([], GREEDY, 0, None, InvalidRequestError),  # empty prompt
    ([1, 10**6], GREEDY, 0, None, InvalidRequestError),  # a token outside the vocabulary
    ([1] * 250, SamplingParams(max_tokens=10), 0, None, InvalidRequestError),  # beyond max_model_len
    ([1] * 150, SamplingParams(max_tokens=10), 0, None, RequestTooLargeError),  # more blocks than the pool
    ([1, 2], SamplingParams(max_tokens=2, logprobs=10**6), 0, None, InvalidRequestError),  # too many logprobs
    ([1, 2], GREEDY, True, None, InvalidRequestError),  # a bool is not a priority
    ([1, 2], GREEDY, 0, "s", InvalidRequestError),  # a salt is an int
]


@pytest.mark.parametrize(("token_ids", "params", "priority", "salt", "error"), BAD)
def test_front_end_checks_raise_what_the_engine_raises(
    replica, token_ids, params, priority, salt, error
) -> None:
    with pytest.raises(error) as engine_err:
        replica.engine.add_request(token_ids, params, request_id="x", priority=priority, cache_salt=salt)
    with pytest.raises(error) as front_err:
        check_request(replica.info(), token_ids, params, priority, salt, None)
    assert type(front_err.value) is type(engine_err.value)
    front = str(front_err.value)  # the same words; the engine's messages may start with "request 'x': "
    assert str(engine_err.value) in (front, f"request 'x': {front}")


def test_front_end_refuses_an_adapter_the_replica_does_not_have(replica) -> None:
    with pytest.raises(InvalidRequestError, match="^unknown LoRA adapter 'nope'; loaded: \\[\\]$"):
        check_request(replica.info(), [1, 2], GREEDY, 0, None, "nope")


def test_replica_step_reply_carries_outputs_results_events_and_load(replica) -> None:
    prompt = [1, 2, 3] * 12  # 36 tokens: two whole blocks of 16
    replica.add(prompt, GREEDY, "a", 0, 0.5, None, None)
    replica.add([4, 5], GREEDY, "b", 0, 0.0, None, "no-such-adapter")  # refused: reported with the step
    first = replica.step()
    assert first.rejected and first.rejected[0][0] == "b"
    assert first.snapshot.num_running == 1 and first.num_unfinished == 1
    keys = prompt_keys(prompt, replica.info().tokens_per_block)
    assert len(keys) == 2  # the prompt's two whole blocks, each published once, in chain order
    assert [(e.kind, e.block_hash) for e in first.events] == [("stored", k) for k in keys]
    tokens = [t for o in first.outputs for t in o.new_token_ids]
    while True:
        reply = replica.step()
        tokens += [t for o in reply.outputs for t in o.new_token_ids]
        if reply.num_unfinished == 0:
            break
    result = reply.results["a"]
    assert result.outputs[0].token_ids == tokens and len(tokens) == 4
    assert result.metrics.ttft is not None and result.metrics.ttft >= 0.5  # the age counts toward TTFT
    replica.add([7, 8, 9], SamplingParams(max_tokens=50), "c", 0, 0.0, None, None)
    replica.abort("c")
    replica.abort("never-added")  # unknown: ignored
    assert replica.step().num_unfinished == 0


def _adapter(path, rank: int = 2) -> str:
    """A random HF PEFT adapter on q_proj of the tiny model."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    path.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(TINY.num_layers):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, TINY.hidden_size, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(TINY.num_heads * TINY.head_dim, rank, generator=gen)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


def test_lora_requests_are_keyed_as_the_router_keys_them(tmp_path) -> None:
    """The replica names its adapters' ids (``ReplicaInfo.lora_ids``); the router's keys for a prompt
    under that id are the block hashes the replica's KV events report for it."""
    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.parts import build_engine_parts
    from kvsched.engine.weights.loader import default_model_path, load_model

    args = EngineArgs(**ENGINE_KW, lora_modules={"sql": _adapter(tmp_path / "sql")})
    loaded = load_model(default_model_path(), dummy_config=TINY, seed=0)  # its own copy: LoRA wraps it
    replica = EngineReplica(engine=Engine(args, parts=build_engine_parts(args, loaded=loaded)))
    info = replica.info()
    assert info.lora_names == ("sql",) and info.lora_ids == dict(replica.engine.lora_names)
    check_request(info, [1, 2, 3], GREEDY, 0, None, "sql")  # a loaded adapter passes
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'poet'"):
        check_request(info, [1, 2, 3], GREEDY, 0, None, "poet")
    prompt = list(range(100, 150))  # 50 tokens: 3 whole blocks of 16 before the last token
    replica.add(prompt, GREEDY, "q", 0, 0.0, 7, "sql")
    stored = [e.block_hash for e in replica.step().events if e.kind == "stored"]
    keys = prompt_keys(prompt, info.tokens_per_block, lora_id=info.lora_ids["sql"], salt=7)
    assert len(keys) == 3 and stored[:3] == keys
    assert keys != prompt_keys(prompt, info.tokens_per_block, salt=7)  # the adapter changes the keys


def test_totals_average_usage_over_live_replicas_and_count_every_replica() -> None:
    """Gauges are over the live replicas (a dead one's last figures do not dilute the mean usage);
    counters add every replica's, so they never go back when one dies."""
    live = ReplicaState(actor=None, routed=3)
    live.snapshot = EngineSnapshot(num_running=2, device_kv_usage=0.5, host_kv_usage=0.25, prefix_queries=10)
    dead = ReplicaState(actor=None, alive=False, routed=4)
    dead.snapshot = EngineSnapshot(num_running=5, device_kv_usage=0.9, host_kv_usage=0.9, prefix_queries=7)
    total = totals([live, dead])
    assert (total.num_running, total.device_kv_usage, total.host_kv_usage) == (2, 0.5, 0.25)
    assert total.prefix_queries == 17
    assert [(r.replica, r.alive, r.routed) for r in total.replicas] == [(0, True, 3), (1, False, 4)]
    assert totals([dead]).device_kv_usage == 0.0
