"""Mutation testing of the core with mutmut: the score per file and every surviving mutant.

    pip install 'mutmut>=3.3'
    python benchmarks/mutation.py                 # the six decision files (about 10 min on 2 cores)
    python benchmarks/mutation.py --scope all     # all of src/kvsched/core + engine/sampler.py
    python benchmarks/mutation.py --only src/kvsched/core/step.py

mutmut (https://github.com/boxed/mutmut) makes the mutants and runs, for each one, only the tests that
execute the mutated function (in a forked process, fastest test first, stopping at the first
failure). This script is its configuration and its report: it copies the repository to a scratch
folder, writes the ``[tool.mutmut]`` section there, runs ``mutmut run`` with ``KVSCHED_MUTATION=1``
(property tests use a fifth of their examples, derandomized, without shrinking; see
``tests/hypothesis_budget.py`` and ``tests/conftest.py``), then prints per file: mutants, killed,
survived, equivalent (listed in ``docs/mutation-equivalents.md``, each with its reason) and the score
``killed / (mutants - equivalent)``. Timeouts count as killed, mutants no test reaches as survived.

Not part of CI: it takes minutes, and the figures belong in the closing note of a change.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "docs" / "mutation-equivalents.md"

#: The files whose every decision the suite must pin down (score >= 95 %, equivalents excluded).
DECISION_FILES = (
    "src/kvsched/core/scheduler/unified.py",
    "src/kvsched/core/scheduler/contexts.py",
    "src/kvsched/core/kvcache/manager.py",
    "src/kvsched/core/kvcache/lifecycle.py",
    "src/kvsched/core/kvcache/block_store.py",
    "src/kvsched/core/step.py",
)
ALL_FILES = ("src/kvsched/core/*", "src/kvsched/engine/sampler.py")
TESTS = ("tests/core", "tests/engine/test_sampler.py")
_LINE = re.compile(
    r"^- `(?P<func>[^`]+)`: `(?P<old>.+?)` → `(?P<new>.*?)`(?: \(after `(?P<ctx>.+?)`\))? — (?P<why>.+)$"
)
_KILLED = {"killed", "timeout", "caught by type check"}


@dataclass(slots=True)
class FileScore:
    mutants: int = 0
    killed: int = 0
    equivalent: int = 0
    survivors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def score(self) -> float:
        scored = self.mutants - self.equivalent
        return 100.0 * self.killed / scored if scored else 100.0


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def prepare(workdir: Path, only: list[str]) -> None:
    """Copy what the tests need and append the mutmut configuration to the copy's pyproject.toml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", "mutants")
    for name in ("src", "tests", "benchmarks"):
        shutil.copytree(ROOT / name, workdir / name, ignore=ignore)
    config = (ROOT / "pyproject.toml").read_text()
    config += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list(only)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(TESTS)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "--hypothesis-profile=mutation"]\n'
        'also_copy = ["benchmarks"]\n'
    )
    (workdir / "pyproject.toml").write_text(config)


def module_file(mutant: str) -> str:
    """``kvsched.core.step.x_apply_step__mutmut_3`` -> ``src/kvsched/core/step.py``."""
    module = mutant.split(".x", 1)[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]
    return "src/" + module.replace(".", "/") + ".py"


def function_name(mutant: str) -> str:
    """A readable function name: ``kvsched.core.kvcache.manager.KVCacheManager.revert``."""
    base = re.sub(r"__mutmut_\d+$", "", mutant)
    m = re.match(r"^(.*)\.x(ǁ.*|_.*)$", base)
    if m is None:
        return base
    module, func = m.groups()
    func = func.replace("ǁ", ".").strip(".") if func.startswith("ǁ") else func[1:]
    return f"{module}.{func}"


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _squash(lines: list[str]) -> str:
    text = " ".join(_strip_comment(line).strip() for line in lines)
    return re.sub(r"\s+", " ", text).strip()


def mutant_diff(workdir: Path, mutant: str) -> tuple[str, str, str]:
    """The mutated line(s) before and after, squashed to one line each, and the line above them."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant], cwd=workdir, capture_output=True, text=True
    ).stdout
    lines = shown.splitlines()
    old = [ln[1:] for ln in lines if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:] for ln in lines if ln.startswith("+") and not ln.startswith("+++")]
    first = next((k for k, ln in enumerate(lines) if ln.startswith("-") and not ln.startswith("---")), 0)
    above = next((ln[1:] for ln in reversed(lines[:first]) if ln.startswith(" ") and ln.strip()), "")
    return _squash([above]), _squash(old), _squash(new)


def load_equivalents() -> dict[tuple[str, str, str, str], str]:
    """(function, line above or "" for any, old, new) -> why."""
    out = {}
    for line in EQUIVALENTS.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            key = (m["func"], _squash([m["ctx"] or ""]), _squash([m["old"]]), _squash([m["new"]]))
            out[key] = m["why"]
    return out


def run(workdir: Path, jobs: int) -> None:
    env = dict(os.environ, KVSCHED_MUTATION="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)]
    log = workdir / "mutmut-run.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode not in (0, 1):
        tail = log.read_text()[-3000:]
        raise SystemExit(f"mutmut run failed with status {proc.returncode}:\n{tail}")


def results(workdir: Path) -> list[tuple[str, str]]:
    listed = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = []
    for line in listed.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            pairs.append((name, status.strip()))
    return pairs


def report(workdir: Path, pairs: list[tuple[str, str]]) -> dict[str, FileScore]:
    equivalents = load_equivalents()
    used: set[tuple[str, str, str, str]] = set()
    scores: dict[str, FileScore] = defaultdict(FileScore)
    statuses = Counter(status for _, status in pairs)
    for name, status in pairs:
        if status in ("skipped", "not checked"):
            continue
        score = scores[module_file(name)]
        score.mutants += 1
        if status in _KILLED:
            score.killed += 1
            continue
        above, old, new = mutant_diff(workdir, name)
        func = function_name(name)
        key = next((k for k in ((func, above, old, new), (func, "", old, new)) if k in equivalents), None)
        if key is not None:
            score.equivalent += 1
            used.add(key)
        else:
            score.survivors.append((name, f"{func} (after `{above}`)", old, new))
    print(f"\nmutmut statuses: {dict(statuses)}\n")
    header = f"{'file':52} {'mutants':>8} {'killed':>7} {'equiv':>6} {'surv':>5} {'score':>7}"
    print(header)
    print("-" * len(header))
    for path in sorted(scores):
        s = scores[path]
        row = f"{path:52} {s.mutants:8d} {s.killed:7d} {s.equivalent:6d} {len(s.survivors):5d}"
        print(f"{row} {s.score:6.1f}%")
    decision = [scores[p] for p in DECISION_FILES if p in scores]
    if decision:
        total = FileScore(
            mutants=sum(s.mutants for s in decision),
            killed=sum(s.killed for s in decision),
            equivalent=sum(s.equivalent for s in decision),
        )
        print(
            f"{'decision files together':52} {total.mutants:8d} {total.killed:7d} {total.equivalent:6d}",
            end="",
        )
        print(f" {total.mutants - total.killed - total.equivalent:5d} {total.score:6.1f}%")
    print("\nsurviving mutants (not listed as equivalent):")
    for path in sorted(scores):
        for name, where, old, new in scores[path].survivors:
            print(f"  {name}  {where}\n      - {old}\n      + {new}")
    stale = set(equivalents) - used
    if stale:
        print(f"\n{len(stale)} entries of {EQUIVALENTS.name} matched no surviving mutant this run:")
        for func, _above, old, new in sorted(stale):
            print(f"  {func}: {old} -> {new}")
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scope", choices=("decision", "all"), default="decision")
    ap.add_argument("--only", nargs="+", help="mutate just these files (globs as mutmut's only_mutate)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (mutmut browse there)")
    ap.add_argument("--report-only", action="store_true", help="report on the --keep folder's last run")
    a = ap.parse_args(argv)
    if a.report_only:
        if a.keep is None:
            raise SystemExit("--report-only needs --keep DIR (the folder of an earlier run)")
        report(a.keep, results(a.keep))
        return 0
    if (
        shutil.which("mutmut") is None
        and subprocess.run([sys.executable, "-c", "import mutmut"], capture_output=True).returncode
    ):
        raise SystemExit("mutmut is not installed: pip install 'mutmut>=3.3'")
    only = a.only or list(DECISION_FILES if a.scope == "decision" else ALL_FILES)
    workdir = a.keep or Path(tempfile.mkdtemp(prefix="kvsched-mutation-"))
    if a.keep and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        prepare(workdir, only)
        print(f"mutating {', '.join(only)} in {workdir} with {a.jobs} workers ...", flush=True)
        run(workdir, a.jobs)
        elapsed = time.perf_counter() - t0
        pairs = results(workdir)
        report(workdir, pairs)
        print(f"\nmutmut run: {elapsed / 60:.1f} min for {len(pairs)} mutants")
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
