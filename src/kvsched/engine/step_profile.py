"""Where an engine step's time goes: cheap ``perf_counter`` timers, off unless asked for.

``EngineArgs.profile_steps=True`` gives the engine a :class:`StepProfile`; each phase of a step adds
its seconds to it. With it off (the default) every hook is one ``is None`` test, so it costs nothing
worth measuring. Phases: ``scheduling`` (the scheduler's pass, suspends and resumes included),
``batch_build`` (the flattened inputs of the forward), ``forward`` (the model, attention included),
``attention`` (paged attention of every layer, counted inside ``forward`` too: the rest of the forward
is projections, MLP and norms, i.e. the matmuls), ``attention_gather`` (the part of ``attention`` that
gathers the paged K/V of each layer), ``sampling``, ``step_update``
(``apply_step``), ``detokenize`` (text deltas and stop strings), and ``other``: the rest of the step
(Python around the phases). TensorRT-LLM's and vLLM's schedulers report the same split to show what
an overlap scheduler could hide behind the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter

#: Phases in print order; ``attention`` (writing this step's K/V, gathering the cached K/V, attending) is a
#: part of ``forward``, ``attention_gather`` a part of ``attention``: neither is added to the total.
PHASES = (
    "forward",
    "attention",
    "attention_gather",
    "batch_build",
    "sampling",
    "detokenize",
    "scheduling",
    "step_update",
    "other",
)
_NESTED = ("attention", "attention_gather")


@dataclass(slots=True)
class StepProfile:
    """Seconds per phase summed over the steps run since the last :meth:`reset`."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    total: float = 0.0
    #: Start of the step under way and the last mark inside it (``perf_counter`` seconds).
    _start: float = 0.0
    _mark: float = 0.0

    def begin(self) -> None:
        """A step starts: its phases are measured from now."""
        self._start = self._mark = perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last mark (or :meth:`begin`) to ``phase``."""
        now = perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now

    def skip(self) -> None:
        """Move the mark to now without charging anything (time already charged by nested timers)."""
        self._mark = perf_counter()

    def after_update(self, ran: bool) -> None:
        """The loop returned: charge ``step_update`` if a batch ran, else the step (scheduling only) ends."""
        if ran:
            self.lap("step_update")
        else:
            self.end()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def end(self) -> None:
        """The step is over: what no phase took is ``other``."""
        now = perf_counter()
        step = now - self._start
        self.total += step
        self.steps += 1
        counted = sum(v for k, v in self.seconds.items() if k != "other" and k not in _NESTED)
        self.seconds["other"] = self.total - counted

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.total = 0.0

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase plus ``total`` and ``steps`` (plain floats, for reports and pickling)."""
        return {**self.seconds, "total": self.total, "steps": float(self.steps)}


def format_profile(figures: dict[str, float]) -> str:
    """One table: ms per step and share of the step time of each phase (``as_dict`` input)."""
    steps = max(int(figures.get("steps", 0)), 1)
    total = figures.get("total", 0.0) or 1e-12
    lines = [f"{'phase':<22} {'ms/step':>8} {'share':>7}"]
    for phase in PHASES:
        s = figures.get(phase, 0.0)
        name = {"attention": "  attention", "attention_gather": "    attention_gather"}.get(phase, phase)
        lines.append(f"{name:<22} {1e3 * s / steps:>8.2f} {s / total:>7.1%}")
    lines.append(f"{'step':<22} {1e3 * total / steps:>8.2f} {1:>7.0%}  ({steps} steps)")
    return "\n".join(lines)
