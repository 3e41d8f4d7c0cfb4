"""PriorityMix: parsing, validation with named errors, seeded weighted draws."""

from __future__ import annotations

from collections import Counter

import pytest

from kvsched.core.errors import ConfigError
from kvsched.core.priority import PriorityMix


def test_parse_and_weighted_seeded_draws() -> None:
    mix = PriorityMix.parse("0:0.9, 5:0.1 ,-2")
    assert mix.classes == ((0, 0.9), (5, 0.1), (-2, 1.0))
    draws = mix.sample(2000, seed=4)
    counts = Counter(draws)
    assert set(counts) == {0, 5, -2}
    assert counts[-2] > counts[0] > counts[5] > 50  # weights 1.0 > 0.9 > 0.1 of 2.0 in all
    assert mix.sample(2000, seed=4) == draws and mix.sample(2000, seed=5) != draws
    assert PriorityMix.parse("3").sample(4) == [3, 3, 3, 3]
    assert PriorityMix.parse("1:2,2:1").sample(0) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "at least one"),
        ("a:1", "PRIORITY:WEIGHT"),
        ("1:x", "PRIORITY:WEIGHT"),
        ("1.5:1", "PRIORITY:WEIGHT"),
        ("1:0", "weight 0.0 of priority 1"),
        ("1:-1", "weight -1.0 of priority 1"),
        ("1:inf", "weight inf"),
        ("2:1,2:3", "priority 2 appears twice"),
    ],
)
def test_bad_mixes_name_the_problem(text, match) -> None:
    with pytest.raises(ConfigError, match=match):
        PriorityMix.parse(text)


def test_bad_constructor_values() -> None:
    with pytest.raises(ConfigError, match="must be an integer"):
        PriorityMix(((True, 1.0),))
    with pytest.raises(ConfigError, match=">= 0"):
        PriorityMix(((1, 1.0),)).sample(-1)
