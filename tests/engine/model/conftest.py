"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
from model_testlib import save_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny(folder, "llama"), folder
