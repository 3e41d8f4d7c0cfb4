"""`kvsched sim` end to end on tiny workloads: table, JSON, plots, and clear errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import kvsched
from kvsched.cli import main


def test_sim_trace_slice_table_json_plots(tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = main(
        ["sim", "--num-requests", "6", "--time-scale", "0.2", "--num-device-blocks", "600",
         "--host-memory-gb", "20", "--policies", "unified,recompute,oracle", "--json", str(out),
         "--plot-dir", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "unified" in text and "goodput/oracle" in text
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["runs"]] == ["unified", "recompute", "oracle"]
    assert all(r["requests"] == 6 for r in data["runs"])
    assert data["runs"][0]["prefix_hit_rate"] > 0  # the trace's first requests share hash block 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "kv_usage.png").exists()


def test_sim_default_trace_from_a_directory_outside_the_repo(tmp_path):
    """No --trace: the trace shipped inside the package, found without the repo as working directory."""
    src = str(Path(kvsched.__file__).resolve().parents[1])  # the kvsched under test, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run(
        [sys.executable, "-m", "kvsched.cli", "sim", "--num-requests", "20", "--policies", "unified",
         "--json", "out.json", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "workload 20 requests, mean prompt 14492" in proc.stdout  # the trace's first 20 requests
    run = json.loads((tmp_path / "out.json").read_text())["runs"][0]
    assert run["policy"] == "unified" and run["requests"] == 20


def test_sim_user_trace_file_gzip(tmp_path, capsys):
    rec = {"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [5, 6]}
    path = tmp_path / "mine.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(rec) + "\n").encode() * 4))
    assert main(["sim", "--trace", str(path), "--policies", "unified", "--no-progress"]) == 0
    assert "workload 4 requests, mean prompt 700" in capsys.readouterr().out
    assert main(["sim", "--trace", str(tmp_path / "none.jsonl"), "--no-progress"]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_sim_synthetic_sweep(tmp_path, capsys):
    rc = main(
        ["sim", "--synthetic", "--num-requests", "20", "--prompt-len", "fixed:64", "--output-len", "fixed:4",
         "--model", "smollm2-135m", "--gpu", "l40s", "--replicas", "2", "--policies", "unified,two-stage:guaranteed_no_evict",
         "--sweep-rates", "5,50", "--plot-dir", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.count("rate ") == 4
    assert (tmp_path / "rate_sweep.png").exists()


def test_sim_bad_input_is_a_clear_error(capsys):
    assert main(["sim", "--policies", "fastest", "--no-progress"]) == 2
    assert "policy 'fastest' is invalid" in capsys.readouterr().err
    assert main(["sim", "--synthetic", "--prompt-len", "gauss:3", "--no-progress"]) == 2
    assert (
        main(["sim", "--model", "llama-3.1-70b", "--gpu", "l40s", "--no-progress", "--num-requests", "1"])
        == 2
    )
    assert "does not fit" in capsys.readouterr().err


def test_ratio_lines_say_na_when_the_oracle_met_no_slo():
    from types import SimpleNamespace

    from kvsched.sim.report import ratio_lines

    def run(name, goodput, tpot99):
        return SimpleNamespace(name=name, summary={"goodput": goodput, "tpot": {"p99": tpot99}})

    lines = ratio_lines([run("oracle", 0.0, 0.2), run("unified", 0.0, 0.1)])
    assert lines == [f"{'unified':32s} goodput/oracle    n/a   p99 TPOT/oracle  0.500"]


def test_policies_are_the_scheduler_kinds_and_an_ignored_capacity_policy_is_refused(capsys):
    from kvsched.core.config import CAPACITY_POLICIES, SCHEDULER_KINDS
    from kvsched.sim.scenario import POLICIES, parse_policy

    expected = ("unified", *(f"two-stage:{p}" for p in CAPACITY_POLICIES), "recompute", "oracle")
    assert expected == POLICIES
    assert [parse_policy(k)[0] for k in SCHEDULER_KINDS] == list(SCHEDULER_KINDS)
    assert parse_policy("two-stage") == ("two-stage", {"policy": "max_utilization"})
    assert main(["sim", "--synthetic", "--policies", "unified:static_batch", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "capacity_policy='static_batch' is not accepted by scheduler='unified'" in err
