"""Synthetic and trace-driven prompt sets for the serving benchmark.

Prompts are built from a fixed list of short English words, each one token (with its leading
space) in common BPE vocabularies, so a prompt of ``n`` words is close to ``n`` tokens on any server
without needing its tokenizer. ``prompt_format="token-ids"`` sends exact token-id lists instead.
Shared prefixes (the ``prefix`` and ``mooncake`` sets) are built block by block from a seed per block,
so requests that share a block id share its text byte for byte.
``priority_mix`` ("0:0.8,10:0.2") gives every request of any dataset a priority, sent as the body's
``priority`` field (kvsched and vLLM both read it; kvsched: higher = more important, vLLM: lower).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvsched.core.errors import ConfigError
from kvsched.core.priority import PriorityMix

PromptFormat = Literal["text", "token-ids"]

# Short, frequent words: one token each (with the leading space) for GPT-2/Llama-style BPE vocabularies.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his he it an were are which this be or "
    "had not but first one their its new after who they have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up such "
    "used many can state about national out known university united then made while part him also "
    "both well three people year between under called could film team left each early high de game "
    "than through same since what good long these them life well work will four before back way home "
    "little great old end day house small place area war men found last five line played water group "
    "power south north east west book song name make take play show live open hand"
)
_WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))


@dataclass(slots=True)
class SampleRequest:
    """One request to send: the prompt, its length in tokens (approximate for text) and output length."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int
    arrival_s: float | None = None  # trace arrival offset in seconds (mooncake), else None
    priority: int | None = None  # sent as the body's "priority" when set (--priority-mix)


@dataclass(slots=True)
class DatasetConfig:
    """Everything the dataset builders read; the CLI fills it from flags."""

    name: str = "random"
    num_prompts: int = 100
    seed: int = 0
    prompt_format: PromptFormat = "text"
    vocab_size: int = 32000  # token-ids format: ids are drawn from [100, vocab_size)
    # random
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    # prefix
    prefix_len: int = 256
    num_prefixes: int = 4
    # mooncake
    trace_path: str | None = None
    trace_block_size: int = 512
    length_scale: float = 1.0
    max_input_len: int | None = None
    max_output_len: int | None = None
    time_scale: float = 1.0
    # any dataset: "PRIORITY:WEIGHT,..." assigns each request a priority (None: no priority field)
    priority_mix: str | None = None

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts={self.num_prompts} is invalid: must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ConfigError(f"range_ratio={self.range_ratio} is invalid: must be in [0, 1)")
        if self.input_len < 1 or self.output_len < 1:
            raise ConfigError("input_len and output_len must be >= 1")
        if self.length_scale <= 0 or self.time_scale <= 0:
            raise ConfigError("length_scale and time_scale must be > 0")
        if self.prompt_format not in ("text", "token-ids"):
            raise ConfigError(f"prompt_format={self.prompt_format!r} is invalid: text or token-ids")


class _Tokens:
    """Makes prompt units (words or ids) from a seeded RNG, in the configured format."""

    __slots__ = ("ids", "vocab_size")

    def __init__(self, cfg: DatasetConfig) -> None:
        self.ids = cfg.prompt_format == "token-ids"
        self.vocab_size = cfg.vocab_size

    def draw(self, rng: random.Random, n: int) -> list:
        if self.ids:
            return [rng.randrange(100, self.vocab_size) for _ in range(n)]
        return [rng.choice(_WORDS) for _ in range(n)]

    def join(self, units: list) -> str | list[int]:
        return list(units) if self.ids else " ".join(units)


def _uniform_len(rng: random.Random, mean: int, ratio: float) -> int:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(low, high)


def random_dataset(cfg: DatasetConfig) -> list[SampleRequest]:
    """Lengths uniform in ``[len * (1 - r), len * (1 + r)]``, random words (vLLM's ``random``)."""
    rng, tok = random.Random(cfg.seed), _Tokens(cfg)
    out = []
    for _ in range(cfg.num_prompts):
        n_in = _uniform_len(rng, cfg.input_len, cfg.range_ratio)
        n_out = _uniform_len(rng, cfg.output_len, cfg.range_ratio)
        out.append(SampleRequest(tok.join(tok.draw(rng, n_in)), n_in, n_out))
    return out


def sharegpt_like_dataset(cfg: DatasetConfig) -> list[SampleRequest]:
    """Chat-shaped lengths without the file: log-normal input (median ~120) and output (median ~180)
    clipped like ShareGPT filtering does (4..1024 in, 4..1024 out), then capped by the max flags."""
    rng, tok = random.Random(cfg.seed), _Tokens(cfg)
    max_in = cfg.max_input_len or 1024
    max_out = cfg.max_output_len or 1024
    out = []
    for _ in range(cfg.num_prompts):
        n_in = min(max_in, max(4, int(rng.lognormvariate(math.log(120), 1.0))))
        n_out = min(max_out, max(4, int(rng.lognormvariate(math.log(180), 0.8))))
        out.append(SampleRequest(tok.join(tok.draw(rng, n_in)), n_in, n_out))
    return out


def prefix_dataset(cfg: DatasetConfig) -> list[SampleRequest]:
    """``num_prefixes`` shared prefixes of ``prefix_len`` tokens, each followed by a unique suffix of
    ``input_len`` tokens; requests cycle over the prefixes (prefix-cache hit rate workload)."""
    rng, tok = random.Random(cfg.seed), _Tokens(cfg)
    prefixes = [
        tok.draw(random.Random(cfg.seed * 1_000_003 + p), cfg.prefix_len) for p in range(cfg.num_prefixes)
    ]
    out = []
    for i in range(cfg.num_prompts):
        n_in = _uniform_len(rng, cfg.input_len, cfg.range_ratio)
        n_out = _uniform_len(rng, cfg.output_len, cfg.range_ratio)
        units = prefixes[i % cfg.num_prefixes] + tok.draw(rng, n_in)
        out.append(SampleRequest(tok.join(units), cfg.prefix_len + n_in, n_out))
    return out


def iter_trace(path: str | Path) -> Iterator[dict]:
    """Records of a Mooncake-format JSONL trace, validated (a bad line names its number)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                int(rec["input_length"]), int(rec["output_length"]), list(rec["hash_ids"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{lineno}: not a Mooncake trace record ({exc})") from exc
            yield rec


def mooncake_dataset(cfg: DatasetConfig) -> list[SampleRequest]:
    """The first ``num_prompts`` records of a Mooncake trace. Each 512-token hash block becomes
    ``round(512 * length_scale)`` units drawn from a seed per block id, so shared blocks stay shared;
    lengths are scaled by ``length_scale`` and capped by the max flags."""
    if not cfg.trace_path:
        raise ConfigError("the mooncake dataset needs --trace-path (a Mooncake JSONL trace)")
    tok = _Tokens(cfg)
    block_units = max(1, round(cfg.trace_block_size * cfg.length_scale))
    blocks: dict[int, list] = {}
    out: list[SampleRequest] = []
    for rec in iter_trace(cfg.trace_path):
        if len(out) == cfg.num_prompts:
            break
        n_in = max(1, math.ceil(int(rec["input_length"]) * cfg.length_scale))
        if cfg.max_input_len:
            n_in = min(n_in, cfg.max_input_len)
        n_out = max(1, math.ceil(int(rec["output_length"]) * cfg.length_scale))
        if cfg.max_output_len:
            n_out = min(n_out, cfg.max_output_len)
        units: list = []
        for block_id in rec["hash_ids"]:
            if len(units) >= n_in:
                break
            block = blocks.get(block_id)
            if block is None:
                block = blocks[block_id] = tok.draw(random.Random(block_id * 7919 + cfg.seed), block_units)
            units.extend(block)
        if len(units) < n_in:  # trace shorter in blocks than in length: pad deterministically
            units.extend(tok.draw(random.Random(len(out)), n_in - len(units)))
        arrival = float(rec.get("timestamp", 0)) / 1000.0 * cfg.time_scale
        out.append(SampleRequest(tok.join(units[:n_in]), n_in, n_out, arrival))
    return out


_BUILDERS = {
    "random": random_dataset,
    "sharegpt-like": sharegpt_like_dataset,
    "prefix": prefix_dataset,
    "mooncake": mooncake_dataset,
}
DATASETS = tuple(_BUILDERS)


def build_dataset(cfg: DatasetConfig) -> list[SampleRequest]:
    """Dispatch on ``cfg.name``; unknown names raise ConfigError listing the choices."""
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError(f"dataset={cfg.name!r} is invalid: choose one of {', '.join(DATASETS)}")
    mix = PriorityMix.parse(cfg.priority_mix) if cfg.priority_mix else None
    samples = builder(cfg)
    if mix is not None:
        for sample, prio in zip(samples, mix.sample(len(samples), cfg.seed)):
            sample.priority = prio
    return samples
