"""Fixtures: a live server over the fake engine."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine
from live_server import LiveServer


@pytest.fixture(scope="module")
def server():
    with LiveServer(FakeEngine(max_model_len=512)) as srv:
        yield srv
