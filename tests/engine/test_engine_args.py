import argparse
import os

import pytest

from kvsched.core.errors import ConfigError
from kvsched.engine import engine_args
from kvsched.engine.engine_args import EngineArgs, add_engine_flags, engine_args_from_namespace


def test_defaults_are_valid_and_size_the_pool_from_the_default_budget(monkeypatch):
    monkeypatch.setattr(engine_args, "available_memory_bytes", lambda: 64 << 30)
    args = EngineArgs()
    cfg = args.cache_config(bytes_per_block=1 << 20)
    assert cfg.num_device_blocks == 1024 and cfg.num_host_blocks == 1024  # a host tier by default
    assert cfg.enable_block_reuse


def test_the_default_host_tier_is_capped_by_available_memory_and_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(engine_args, "available_memory_bytes", lambda: 400 << 20)
    cfg = EngineArgs().cache_config(bytes_per_block=1 << 20)
    assert cfg.num_host_blocks == 100  # a quarter of 400 MiB
    monkeypatch.setattr(engine_args, "available_memory_bytes", lambda: None)
    assert EngineArgs().cache_config(bytes_per_block=1 << 20).num_host_blocks == 1024
    assert EngineArgs(num_host_blocks=0).cache_config(bytes_per_block=1 << 20).num_host_blocks == 0
    assert EngineArgs(host_kv_bytes=0).cache_config(bytes_per_block=1 << 20).num_host_blocks == 0


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads Linux MemAvailable")
def test_available_memory_is_read_from_the_os():
    with open("/proc/meminfo") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    got = engine_args.available_memory_bytes()
    assert got is not None and abs(got - kib * 1024) < 1 << 30  # the same reading, a moment later


def test_byte_budgets_become_blocks():
    args = EngineArgs(device_kv_bytes=10_000, host_kv_bytes=25_000)
    cfg = args.cache_config(bytes_per_block=1000)
    assert (cfg.num_device_blocks, cfg.num_host_blocks) == (10, 25)


def test_block_counts_win_when_given():
    cfg = EngineArgs(num_device_blocks=7, num_host_blocks=3).cache_config(bytes_per_block=10**9)
    assert (cfg.num_device_blocks, cfg.num_host_blocks) == (7, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int3"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"scheduler": "fifo"}, "scheduler"),
        ({"capacity_policy": "greedy"}, "capacity_policy"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"num_device_blocks": 0}, "num_device_blocks"),
        ({"num_device_blocks": 4, "device_kv_bytes": 100}, "not both"),
        ({"num_host_blocks": 4, "host_kv_bytes": 100}, "not both"),
        ({"device_kv_bytes": -1}, "device_kv_bytes"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"tokens_per_block": 16, "chunk_unit_size": 24}, "multiple"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineArgs(**kwargs)


@pytest.mark.parametrize("name", ["num_speculative_tokens", "lora_page_bytes"])
@pytest.mark.parametrize("value", [None, True, "64", 0, 1.5])
def test_required_integer_fields_refuse_none_and_non_integers(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}={value!r} is invalid: must be an integer >= 1$"):
        EngineArgs(**{name: value})


def test_optional_integer_fields_take_none():
    """None is accepted (no ConfigError) and kept, not replaced by a default."""
    args = EngineArgs(max_lora_pages=None, draft_num_layers=None, draft_kv_bytes=None)
    assert args.max_lora_pages is args.draft_num_layers is args.draft_kv_bytes is None
    assert EngineArgs(lora_page_bytes=1).lora_page_bytes == 1


def test_budget_below_one_block_is_an_error():
    with pytest.raises(ConfigError, match="smaller than one KV block"):
        EngineArgs(device_kv_bytes=10).cache_config(bytes_per_block=100)


def test_unknown_keyword_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown engine argument.*max_batch_size"):
        EngineArgs.from_kwargs(None, max_batch=3)


def test_cli_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    ns = parser.parse_args(
        ["--scheduler", "two-stage", "--num-device-blocks", "12", "--no-enable-block-reuse", "--seed", "5"]
    )
    args = engine_args_from_namespace(ns)
    assert args.scheduler == "two-stage" and args.num_device_blocks == 12
    assert not args.enable_block_reuse and args.seed == 5 and args.model is None


def test_priority_mode_flag_reaches_the_scheduler_config():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert not engine_args_from_namespace(parser.parse_args([])).priority_mode
    args = engine_args_from_namespace(parser.parse_args(["--priority-mode"]))
    assert args.priority_mode and args.scheduler_config().priority_mode


def test_a_capacity_policy_for_a_scheduler_that_ignores_it_is_refused():
    from kvsched.engine.llm import LLM

    for kind in ("unified", "recompute"):
        with pytest.raises(ConfigError, match=f"capacity_policy='static_batch'.*scheduler='{kind}'"):
            EngineArgs(scheduler=kind, capacity_policy="static_batch")
    with pytest.raises(ConfigError, match="capacity_policy"):  # refused before any model loads
        LLM(scheduler="unified", capacity_policy="max_utilization")
    assert EngineArgs().capacity_policy is None  # the default is "not given", so no refusal
    assert (
        EngineArgs(scheduler="two-stage", capacity_policy="static_batch").scheduler_config().capacity_policy
    )


def test_the_flags_offer_the_one_list_of_kinds_and_policies():
    from kvsched.core.config import CAPACITY_POLICIES, SCHEDULER_KINDS

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    choices = {a.dest: a.choices for a in parser._actions}
    assert tuple(choices["scheduler"]) == SCHEDULER_KINDS == ("unified", "two-stage", "recompute")
    assert tuple(choices["capacity_policy"]) == CAPACITY_POLICIES
    ns = parser.parse_args(["--scheduler", "recompute", "--capacity-policy", "static_batch"])
    with pytest.raises(ConfigError, match="capacity_policy"):
        engine_args_from_namespace(ns)
