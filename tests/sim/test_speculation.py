"""Speculation in the simulator: the acceptance law, the draft's cost, what it changes, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.core.errors import ConfigError
from kvsched.sim.hardware import load_gpu
from kvsched.sim.models import load_model
from kvsched.sim.scenario import Scenario
from kvsched.sim.speculation import DrawnAcceptance, ReplayedAcceptance, Speculation
from kvsched.sim.synthetic import LengthDist, synthetic_workload


def test_drawn_acceptance_is_a_truncated_geometric_per_request_and_order_free():
    acc = DrawnAcceptance(0.6, seed=1)
    counts = np.array([acc.accepted(7, 4) for _ in range(20000)])
    # P(accepted >= i) = 0.6^i: the mean is 0.6 + 0.36 + 0.216 + 0.1296
    assert counts.mean() == pytest.approx(1.3056, abs=0.03)
    assert counts.min() == 0 and counts.max() == 4
    a, b = DrawnAcceptance(0.6, 0.2, seed=3), DrawnAcceptance(0.6, 0.2, seed=3)
    first = [a.accepted(1, 3) for _ in range(50)] + [a.accepted(2, 3) for _ in range(50)]
    second_2 = [b.accepted(2, 3) for _ in range(50)]  # request 2 first: its draws do not change
    second_1 = [b.accepted(1, 3) for _ in range(50)]
    assert first == second_1 + second_2
    rates = [DrawnAcceptance(0.6, 0.2, seed=0).request_rate(r) for r in range(2000)]
    assert np.mean(rates) == pytest.approx(0.6, abs=0.02) and np.std(rates) == pytest.approx(0.2, abs=0.02)


def test_replayed_acceptance_refuses_a_count_it_does_not_have():
    rep = ReplayedAcceptance({0: [2]})
    assert rep.accepted(0, 3) == 2
    with pytest.raises(ConfigError, match="no recorded acceptance"):
        rep.accepted(0, 3)
    with pytest.raises(ConfigError, match="3 accepted of 2"):
        ReplayedAcceptance({0: [3]}).accepted(0, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="medusa"), "speculative='medusa'"),
        (dict(method="ngram", num_speculative_tokens=0), "num_speculative_tokens=0"),
        (dict(method="ngram", acceptance_rate=1.5), "acceptance_rate=1.5"),
        (dict(method="ngram", acceptance_spread=0.6), "acceptance_spread=0.6"),
        (dict(method="ngram", draft_num_layers=2), "needs speculative='draft'"),
    ],
)
def test_bad_speculation_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Speculation(**kwargs)


def test_a_draft_model_with_another_vocabulary_is_refused():
    spec = Speculation("draft", draft_model=load_model("mistral-7b"))
    with pytest.raises(ConfigError, match="share the target's vocabulary"):
        spec.draft_spec(load_model("llama-3.1-8b"))
    with pytest.raises(ConfigError, match="draft_num_layers=40"):
        Speculation("draft", draft_num_layers=40).draft_spec(load_model("llama-3.1-8b"))


def _run(spec: Speculation | None, blocks: int | None = 4000) -> dict:
    scen = Scenario(load_model("llama-3.1-8b"), load_gpu("h200"), num_device_blocks=blocks, speculation=spec)
    specs = synthetic_workload(24, 4.0, LengthDist.parse("fixed:512"), LengthDist.parse("fixed:128"), seed=0)
    return scen.simulator(specs, "unified").run().summary


def test_speculation_cuts_decode_time_and_a_draft_model_costs_its_forwards():
    base = _run(None)
    free = _run(Speculation("ngram", 4, acceptance_rate=0.8))
    draft = _run(Speculation("draft", 4, acceptance_rate=0.8))
    useless = _run(Speculation("draft", 4, acceptance_rate=0.0))
    assert free["tpot"]["mean"] < draft["tpot"]["mean"] < base["tpot"]["mean"]
    assert useless["tpot"]["mean"] > base["tpot"]["mean"]  # k + 1 verified, 1 kept, draft forwards paid
    assert free["spec_mean_accepted_tokens_per_step"] == pytest.approx(0.8 + 0.64 + 0.512 + 0.4096, abs=0.15)
    assert useless["spec_acceptance_rate"] == 0.0
    assert "spec_acceptance_rate" not in base


def test_a_draft_kv_cache_takes_its_share_of_the_device_budget():
    model, gpu = load_model("llama-3.1-8b"), load_gpu("h200")
    plain = Scenario(model, gpu).device_blocks()
    quarter = Scenario(model, gpu, speculation=Speculation("draft")).device_blocks()  # 8 of 32 layers
    assert quarter == pytest.approx(plain / 1.25, rel=1e-3)
    assert Scenario(model, gpu, speculation=Speculation("ngram")).device_blocks() == plain


def test_sim_cli_speculative_flags(tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = main(
        ["sim", "--synthetic", "--num-requests", "12", "--prompt-len", "fixed:256", "--output-len", "fixed:64",
         "--policies", "unified", "--speculative", "draft", "--num-speculative-tokens", "2",
         "--acceptance-rate", "0.5", "--acceptance-spread", "0.1", "--draft-num-layers", "4",
         "--json", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert 0 < run["spec_acceptance_rate"] < 1 and run["requests"] == 12
    assert (
        main(["sim", "--synthetic", "--speculative", "ngram", "--acceptance-rate", "2", "--no-progress"]) == 2
    )
    assert "acceptance_rate=2" in capsys.readouterr().err
