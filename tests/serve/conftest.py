"""Fixtures: a live server over the fake executor."""

from __future__ import annotations

import pytest
from fake_executor import FakeExecutor
from live_server import LiveServer


@pytest.fixture(scope="module")
def server():
    with LiveServer(FakeExecutor(max_model_len=512)) as srv:
        yield srv
