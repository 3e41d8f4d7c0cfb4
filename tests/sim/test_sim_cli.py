"""`kvsched sim` end to end on tiny workloads: table, JSON, plots, and clear errors."""

from __future__ import annotations

import json

from kvsched.cli import main

TRACE = "/work/shared/traces/mooncake_conversation_trace.jsonl"


def test_sim_trace_slice_table_json_plots(tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = main(
        ["sim", "--trace", TRACE, "--num-requests", "6", "--time-scale", "0.2", "--num-device-blocks", "600",
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
