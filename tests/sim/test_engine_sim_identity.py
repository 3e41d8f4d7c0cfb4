"""The simulator and the real engine take identical scheduling decisions for the same workload.

The engine (tiny random-weight Llama, greedy, `ignore_eos` so output lengths are fixed) is driven on a
virtual clock: each step that runs something lasts the next duration of a fixed list, and a request is
added once virtual time reaches its arrival, exactly as the simulator admits it. The simulator gets the
same list through a replaying cost model and the engine's own cache config and scheduler budgets. Both
step logs must then agree on every context chunk, generation and suspension.

With speculation (prompt lookup, or a truncated-target draft model with its own mirrored KV cache) the
engine's per-step accepted counts are replayed by the simulator (`ReplayedAcceptance`): the scheduler
sees `1 + k` draft slots per decode on both sides, both append `1 + accepted` tokens and give the rest
back, and the logs must still agree step for step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvsched.core.request import SamplingParams  # noqa: E402
from kvsched.engine.engine import Engine  # noqa: E402
from kvsched.engine.engine_args import EngineArgs  # noqa: E402
from kvsched.engine.model_config import ModelConfig  # noqa: E402
from kvsched.engine.parts import build_engine_parts  # noqa: E402
from kvsched.engine.weights.dummy import dummy_model  # noqa: E402
from kvsched.sim.cost import StepShape  # noqa: E402
from kvsched.sim.simulator import Simulator, StepDecision, decision_of  # noqa: E402
from kvsched.sim.speculation import ReplayedAcceptance, SimSpeculation  # noqa: E402
from kvsched.sim.workload import RequestSpec, prefix_base, unique_base  # noqa: E402

VOCAB = 256
CONFIG = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=512,
)
# a pool of 24 x 16 tokens holds ~2 of the long requests: the schedulers must suspend / preempt
ENGINE = dict(tokens_per_block=16, num_device_blocks=24, num_host_blocks=64, enable_block_reuse=True)
SCHED = dict(max_batch_size=6, max_num_tokens=96, chunk_unit_size=32)
KINDS = [("unified", None), ("two-stage", "max_utilization"), ("recompute", None)]


def _workload(n: int = 16, seed: int = 3) -> list[RequestSpec]:
    """Staggered arrivals (bursts and gaps), varied prompt/output lengths, half share a 48-token prefix."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([0.0, 0.01, 0.06, 0.2], size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    specs = []
    for rid in range(n):
        segs = [(unique_base(rid), int(rng.integers(10, 140)))]
        if rid % 2 == 0:
            segs.insert(0, (prefix_base(0), 48))
        out = int(rng.integers(2, 40))
        specs.append(RequestSpec(rid, float(arrivals[rid]), tuple(segs), out, vocab_size=VOCAB))
    return specs


def _durations(count: int = 4096, seed: int = 5) -> list[float]:
    """Step durations both sides replay in step order: uneven, so arrivals interleave differently."""
    return np.random.default_rng(seed).uniform(0.005, 0.02, size=count).tolist()


@dataclass(slots=True)
class ReplayCost:
    """A cost model that ignores the batch and returns the given durations one per step."""

    durations: list[float]
    calls: int = 0

    def step_time(self, shape: StepShape) -> float:
        t = self.durations[self.calls]
        self.calls += 1
        return t


@dataclass(slots=True)
class RecordingScheduler:
    """Wraps the engine's scheduler: logs every step that runs something, as the simulator does."""

    inner: object
    decisions: list[StepDecision] = field(default_factory=list)
    last_empty: bool = False
    drafting: list[int] = field(default_factory=list)  # generations given draft slots in the last pass

    def schedule(self, active, inflight_request_ids=frozenset()):
        out = self.inner.schedule(active, inflight_request_ids)
        self.last_empty = not out.context_requests and not out.generation_requests
        self.drafting = [r.request_id for r in out.generation_requests if r.draft_tokens]
        if not self.last_empty:
            self.decisions.append(decision_of(len(self.decisions), out))
        return out


def _engine(kind: str, policy: str | None, sched: dict, **spec) -> Engine:
    args = EngineArgs(scheduler=kind, capacity_policy=policy, **ENGINE, **sched, **spec)
    model = dummy_model(CONFIG, seed=0)
    return Engine(args, parts=build_engine_parts(args, loaded=(model, CONFIG, None)))


def _run_engine(
    ex: Engine, specs: list[RequestSpec], durations: list[float], accepted: dict | None = None
) -> list[StepDecision]:
    """The simulator's time rules: admit arrivals up to `now`, idle to the next one, step, add a duration.

    `accepted` (speculation) collects, per request, the drafts the target accepted at each step.
    """
    rec = RecordingScheduler(ex.scheduler)
    ex.loop.scheduler = rec
    pending = sorted(specs, key=lambda s: (s.arrival_time, s.request_id))
    now, i, steps = 0.0, 0, 0
    while i < len(pending) or ex.has_unfinished_requests():
        if not ex.has_unfinished_requests():
            now = max(now, pending[i].arrival_time)
        while i < len(pending) and pending[i].arrival_time <= now:
            s = pending[i]
            params = SamplingParams(max_tokens=s.output_len, temperature=0.0, ignore_eos=True)
            internal = ex.add_request(s.prompt_tokens(), params, arrival_time=s.arrival_time)
            assert internal == s.request_id  # same ids on both sides (the schedulers may tie-break on them)
            i += 1
        ex.step()
        if accepted is not None and not rec.last_empty:
            produced = ex.spec.counts.produced
            for rid in rec.drafting:
                accepted.setdefault(rid, []).append(len(produced[rid]) - 1)
        if rec.last_empty:  # nothing ran: like the simulator, wait for the next arrival
            assert i < len(pending), "the engine scheduler ran nothing with no arrival left"
            now = max(now, pending[i].arrival_time)
            continue
        now += durations[steps]
        steps += 1
    for s in specs:  # every request produced exactly its output length
        assert len(ex.pop_output(s.request_id).outputs[0].token_ids) == s.output_len
    return rec.decisions


def _run_sim(ex: Engine, kind: str, policy: str | None, specs, durations, sched: dict, spec=None):
    extra = {} if policy is None else {"policy": policy}
    sim = Simulator(
        specs, ReplayCost(durations), ex.parts.cache_config, scheduler=kind, record_decisions=True,
        speculation=spec, **sched, **extra,
    )  # fmt: skip
    return sim.run()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("kind", "policy"), KINDS, ids=[k for k, _ in KINDS])
def test_engine_and_simulator_take_identical_decisions(kind, policy):
    specs, durations = _workload(), _durations()
    ex = _engine(kind, policy, SCHED)
    engine = _run_engine(ex, specs, durations)
    res = _run_sim(ex, kind, policy, specs, durations, SCHED)
    assert res.summary["requests"] == len(specs)
    diff = next((i for i, (a, b) in enumerate(zip(engine, res.decisions)) if a != b), None)
    assert diff is None, f"step {diff}: engine {engine[diff]} != sim {res.decisions[diff]}"
    assert len(engine) == len(res.decisions)
    # the workload exercises what the test is about: chunked prefill, batching, reuse, displacement
    chunks = Counter(rid for d in engine for rid, _ in d.context)
    assert max(chunks.values()) > 1, "some prompt is prefilled in several chunks"
    assert any(len(d.context) > 1 or (d.context and d.generation) for d in engine)
    assert any(d.paused or d.preempted for d in engine), "the pool is small enough to force displacement"
    assert res.summary["prefix_hit_tokens_device"] + res.summary["prefix_hit_tokens_host"] > 0


def test_a_different_budget_or_clock_on_one_side_is_caught():
    """The comparison is sharp: a token budget or step durations differing on one side change the log."""
    specs, durations = _workload(), _durations()
    ex = _engine("unified", None, SCHED)
    engine = _run_engine(ex, specs, durations)
    assert _run_sim(ex, "unified", None, specs, durations, SCHED).decisions == engine
    res = _run_sim(ex, "unified", None, specs, durations, {**SCHED, "max_num_tokens": 64})
    assert engine != res.decisions
    slower = [d * 1.2 for d in durations]  # arrivals land in other steps
    assert _run_sim(ex, "unified", None, specs, slower, SCHED).decisions != engine


SPECS = [("ngram", {}), ("draft", {"draft_num_layers": 1})]


@pytest.mark.parametrize(("method", "extra"), SPECS, ids=[m for m, _ in SPECS])
@pytest.mark.parametrize(("kind", "policy"), KINDS, ids=[k for k, _ in KINDS])
def test_with_speculation_engine_and_simulator_take_identical_decisions(kind, policy, method, extra):
    """k = 3 drafts per decode; the simulator replays the engine's accepted counts (and, with a draft
    model, mirrors a draft cache of the engine's draft config, so its suspensions and drops agree too)."""
    specs, durations = _workload(), _durations()
    ex = _engine(kind, policy, SCHED, speculative=method, num_speculative_tokens=3, **extra)
    accepted: dict[int, list[int]] = {}
    engine = _run_engine(ex, specs, durations, accepted)
    draft_kv = ex.parts.draft_kv
    spec = SimSpeculation(
        3, ReplayedAcceptance(accepted), draft_cache=None if draft_kv is None else draft_kv.config
    )
    res = _run_sim(ex, kind, policy, specs, durations, SCHED, spec)
    assert res.summary["requests"] == len(specs)
    diff = next((i for i, (a, b) in enumerate(zip(engine, res.decisions)) if a != b), None)
    assert diff is None, f"step {diff}: engine {engine[diff]} != sim {res.decisions[diff]}"
    assert len(engine) == len(res.decisions)
    # every recorded count was replayed, and speculation did something: some drafts kept, some not
    flat = [a for counts in accepted.values() for a in counts]
    assert len(flat) == sum(spec.acceptance._next.values())
    assert 0 < sum(flat) < 3 * len(flat)
    assert res.summary["spec_mean_accepted_tokens_per_step"] == pytest.approx(sum(flat) / len(flat))
    assert any(d.paused or d.preempted for d in engine), "the pool is small enough to force displacement"


def test_speculation_the_simulator_does_not_replay_changes_the_decisions():
    """Sharpness: the same engine log against a simulator told that every draft was rejected differs."""
    specs, durations = _workload(), _durations()
    ex = _engine("unified", None, SCHED, speculative="ngram", num_speculative_tokens=3)
    accepted: dict[int, list[int]] = {}
    engine = _run_engine(ex, specs, durations, accepted)
    assert sum(map(sum, accepted.values())) > 0
    rejected = {rid: [0] * (len(c) + 64) for rid, c in accepted.items()}
    res = _run_sim(
        ex, "unified", None, specs, durations, SCHED, SimSpeculation(3, ReplayedAcceptance(rejected))
    )
    assert res.decisions != engine
