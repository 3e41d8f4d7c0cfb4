"""The issue's 8,192/1,024 offline run with no host tier ended in SchedulerDeadlockError (partially
prefilled contexts filled the pool and nothing could be suspended). Scaled down 8x here (1,024/128, a
pool of 6,400 tokens, a step budget of 8,192): every policy finishes every request, the unified
scheduler by degrading suspension to recompute as the engine does."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main


@pytest.mark.parametrize("policy", ["unified", "two-stage:max_utilization", "recompute"])
def test_offline_long_prompts_without_host_tier_run_to_completion(tmp_path, capsys, policy):
    out = tmp_path / "r.json"
    rc = main(
        ["sim", "--model", "llama-3.1-8b", "--gpu", "h200", "--synthetic", "--rate", "inf",
         "--num-requests", "40", "--prompt-len", "fixed:1024", "--output-len", "fixed:128",
         "--num-device-blocks", "200", "--host-memory-gb", "0", "--max-batch-size", "512",
         "--max-num-tokens", "8192", "--policies", policy, "--json", str(out), "--no-progress"]
    )  # fmt: skip
    capsys.readouterr()
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["requests"] == 40 and run["rejected"] == 0
    assert run["output_token_throughput"] * run["duration_s"] == pytest.approx(40 * 128, rel=1e-6)
    if policy == "unified":
        assert run["suspends"] == 0 and run["preemptions"] > 0  # no host tier: recompute, not suspension
