"""``import kvsched`` and every module of ``kvsched.core`` import with torch blocked, and never load it.

The check runs in a fresh interpreter with a meta-path finder that refuses torch, so a module that
imports torch (directly or through another module) fails loudly instead of passing because torch
happens to be installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvsched

_PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked: {name}")
        return None

sys.meta_path.insert(0, BlockTorch())

def fail(name):
    raise sys.exc_info()[1]

import kvsched, kvsched.core
lazy = {n: m for n, m in kvsched._LAZY.items() if m.startswith("kvsched.core")}
for name in lazy:
    getattr(kvsched, name)
modules = [m.name for m in pkgutil.walk_packages(kvsched.core.__path__, "kvsched.core.", onerror=fail)]
for name in modules:
    importlib.import_module(name)
try:
    importlib.import_module("kvsched.engine.kv_storage")
    engine_blocked = False
except ImportError:
    engine_blocked = True
print(json.dumps({
    "modules": modules,
    "lazy": sorted(lazy),
    "torch_loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
    "engine_blocked": engine_blocked,
}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_every_core_module_imports_without_torch(probe):
    assert probe["torch_loaded"] == []
    # The walk really covered the tree: the manager, every scheduler and the step update are in it.
    for name in (
        "kvsched.core.kvcache.manager",
        "kvsched.core.kvcache.storage",
        "kvsched.core.scheduler.unified",
        "kvsched.core.scheduler.two_stage",
        "kvsched.core.scheduler.recompute",
        "kvsched.core.step",
        "kvsched.core.peft",
    ):
        assert name in probe["modules"]


def test_the_lazy_core_names_resolve_without_torch(probe):
    assert {"CacheConfig", "KVCacheManager", "UnifiedScheduler", "SchedulerOutput"} <= set(probe["lazy"])


def test_the_blocker_catches_a_module_that_imports_torch(probe):
    # The tensor backend imports torch at module level; if it imported here the block would be a no-op.
    assert probe["engine_blocked"]


def test_unknown_public_name_is_a_clear_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        kvsched.NotAName  # noqa: B018
