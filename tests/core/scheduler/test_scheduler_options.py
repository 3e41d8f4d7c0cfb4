"""One validation of scheduler options: make_scheduler, SchedulerConfig and the constructors agree."""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV

from kvsched.core.config import (
    CAPACITY_POLICIES,
    SCHEDULER_KINDS,
    CapacityPolicy,
    SchedulerConfig,
    validate_scheduler_options,
)
from kvsched.core.errors import ConfigError
from kvsched.core.scheduler import (
    RecomputeScheduler,
    TwoStageScheduler,
    UnifiedScheduler,
    make_scheduler,
)


def test_the_kinds_are_the_schedulers_make_scheduler_builds():
    built = {kind: type(make_scheduler(kind, FakeKV(), max_batch_size=2)) for kind in SCHEDULER_KINDS}
    assert built == {
        "unified": UnifiedScheduler,
        "two-stage": TwoStageScheduler,
        "recompute": RecomputeScheduler,
    }
    assert tuple(m.value for m in CapacityPolicy) == CAPACITY_POLICIES


@pytest.mark.parametrize("kind", ["unified", "recompute"])
@pytest.mark.parametrize("policy", ["max_utilization", CapacityPolicy.STATIC_BATCH])
def test_a_capacity_policy_is_refused_where_it_would_be_ignored(kind, policy):
    with pytest.raises(ConfigError, match=rf"capacity_policy=.*scheduler='{kind}'.*two-stage scheduler only"):
        make_scheduler(kind, FakeKV(), max_batch_size=2, policy=policy)
    with pytest.raises(ConfigError, match="capacity_policy"):
        SchedulerConfig(scheduler=kind, capacity_policy=getattr(policy, "value", policy))


def test_not_giving_a_policy_is_fine_everywhere_and_two_stage_defaults_to_max_utilization():
    for kind in SCHEDULER_KINDS:
        assert make_scheduler(kind, FakeKV(), max_batch_size=2, policy=None) is not None
        assert SchedulerConfig(scheduler=kind).capacity_policy is None  # type: ignore[arg-type]
    assert make_scheduler("two-stage", FakeKV(), max_batch_size=2).policy is CapacityPolicy.MAX_UTILIZATION
    assert TwoStageScheduler(FakeKV(), max_batch_size=2).policy is CapacityPolicy.MAX_UTILIZATION
    two_stage = SchedulerConfig(scheduler="two-stage", capacity_policy="static_batch")
    assert two_stage.capacity_policy == "static_batch"


def test_the_recompute_constructor_refuses_a_policy_too():
    with pytest.raises(ConfigError, match="capacity_policy"):
        RecomputeScheduler(FakeKV(), max_batch_size=2, policy="max_utilization")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2, "max_num_tokens": 0}, "max_num_tokens"),
        ({"max_batch_size": 2, "chunk_unit_size": -1}, "chunk_unit_size"),
        ({"max_batch_size": 2.0}, "max_batch_size"),
    ],
)
def test_every_path_applies_the_same_budget_rules(options, field):
    """SchedulerConfig used to refuse zero budgets that the schedulers accepted; now one rule."""
    with pytest.raises(ConfigError, match=field):
        validate_scheduler_options("unified", **options)
    with pytest.raises(ConfigError, match=field):
        SchedulerConfig(**options)
    for kind in SCHEDULER_KINDS:
        with pytest.raises(ConfigError, match=field):
            make_scheduler(kind, FakeKV(), **options)


def test_make_scheduler_names_a_missing_batch_size_and_an_unknown_kind():
    with pytest.raises(ConfigError, match="max_batch_size=None"):
        make_scheduler("unified", FakeKV())
    with pytest.raises(ConfigError, match="scheduler='fifo'.*unified, two-stage, recompute"):
        make_scheduler("fifo", FakeKV(), max_batch_size=2)
