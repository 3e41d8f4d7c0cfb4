"""A deployment to simulate: model x GPU x parallelism x memory split x scheduler budgets.

Turns "Llama-3.1-8B on one H200 with 200 GB of host memory" into a cost model, a `CacheConfig` and a
`Simulator` per policy, so several policies run on exactly the same deployment and workload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsched.core.config import (
    CAPACITY_POLICIES,
    CAPACITY_POLICY_KINDS,
    SCHEDULER_KINDS,
    CacheConfig,
    check_capacity_policy,
)
from kvsched.core.errors import ConfigError
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GpuSpec
from kvsched.sim.lora import LoraSpec
from kvsched.sim.metrics import SLO
from kvsched.sim.models import ModelSpec
from kvsched.sim.simulator import Simulator
from kvsched.sim.speculation import DrawnAcceptance, SimSpeculation, Speculation
from kvsched.sim.workload import RequestSpec


def _policy_names() -> tuple[str, ...]:
    """Every scheduler kind (with each capacity policy where it takes one), then `oracle`: the
    unified scheduler with a device pool no request ever waits for."""
    names: list[str] = []
    for kind in SCHEDULER_KINDS:
        takes_policy = kind in CAPACITY_POLICY_KINDS
        names += [f"{kind}:{p}" for p in CAPACITY_POLICIES] if takes_policy else [kind]
    return (*names, "oracle")


POLICIES = _policy_names()


def parse_policy(text: str) -> tuple[str, dict[str, Any]]:
    """A scheduler kind, `kind:capacity_policy` (two-stage) or `oracle` -> (kind, extra keywords)."""
    kind, sep, policy = text.partition(":")
    if kind in SCHEDULER_KINDS and (not sep or policy):
        # Same rule as make_scheduler: a policy only where the kind takes one (default max_utilization).
        chosen = check_capacity_policy(kind, policy or None)
        return kind, {} if chosen is None else {"policy": chosen.value}
    if text == "oracle":
        return kind, {}
    raise ConfigError(f"policy {text!r} is invalid: one of {', '.join(POLICIES)}")


@dataclass(slots=True)
class Scenario:
    """Everything but the workload and the policy."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    tokens_per_block: int = 32
    gpu_memory_fraction: float = 0.9  # of HBM usable for weights + KV (the rest: activations, runtime)
    num_device_blocks: int | None = None  # None: what the HBM left after weights holds
    host_memory_gb: float = 0.0  # host tier per GPU (0 = no host tier)
    enable_block_reuse: bool = True
    max_batch_size: int = 256
    max_num_tokens: int | None = 8192
    chunk_unit_size: int | None = 256
    step_overhead: float = 2e-3
    overlap_copies: bool = True
    slo: SLO = field(default_factory=SLO)
    num_replicas: int = 1  # data-parallel instances (each tp GPUs) behind a router
    router: str = "least_loaded"
    lora_max_pages: int = 0  # > 0: device pages for LoRA adapters (PEFT budget per replica)
    lora_pages_per_adapter: int = 1
    lora: LoraSpec = field(default_factory=LoraSpec)  # adapter shape: LoRA FLOPs, weight reads, loads
    priority_mode: bool = False  # schedulers serve higher RequestSpec.priority first
    speculation: Speculation | None = None  # speculative decoding (prompt lookup or a draft model)

    def cost_model(self) -> RooflineCostModel:
        return RooflineCostModel(
            self.model,
            self.gpu,
            tp=self.tp,
            step_overhead=self.step_overhead,
            overlap_copies=self.overlap_copies,
            lora=self.lora,
        )

    @property
    def block_bytes(self) -> float:
        """KV bytes of one block on one GPU."""
        return self.tokens_per_block * self.model.kv_bytes_per_token_per_gpu(self.tp)

    @property
    def draft_block_bytes(self) -> float:
        """Draft-model KV bytes of one block on one GPU (0 without a draft model)."""
        spec = self.speculation
        draft = None if spec is None else spec.draft_spec(self.model)
        return 0.0 if draft is None else self.tokens_per_block * draft.kv_bytes_per_token_per_gpu(self.tp)

    def device_blocks(self) -> int:
        """As the engine sizes its pools: with a draft model, both caches get the same block count
        from one budget (and a separate draft checkpoint's weights come off it first)."""
        if self.num_device_blocks is not None:
            return self.num_device_blocks
        free = self.gpu.hbm_bytes * self.gpu_memory_fraction - self.model.weight_bytes_total / self.tp
        spec = self.speculation
        if spec is not None and spec.draft_model is not None and spec.method == "draft":
            free -= spec.draft_model.weight_bytes_total / self.tp
        blocks = int(free // (self.block_bytes + self.draft_block_bytes))
        if blocks < 1:
            raise ConfigError(
                f"{self.model.name} ({self.model.weight_bytes_total / 1e9:.1f} GB) does not fit "
                f"{self.tp} x {self.gpu.name} at gpu_memory_fraction={self.gpu_memory_fraction}"
            )
        return blocks

    def host_blocks(self) -> int:
        if self.host_memory_gb < 0:
            raise ConfigError(f"host_memory_gb={self.host_memory_gb} must be >= 0")
        return int(self.host_memory_gb * 1e9 // (self.block_bytes + self.draft_block_bytes))

    def oracle_blocks(self, specs: Sequence[RequestSpec]) -> int:
        """A device pool no request of `specs` ever waits for (capped by what a batch can hold)."""
        tpb = self.tokens_per_block
        per = [-(-s.total_tokens // tpb) + 1 for s in specs] or [1]
        return max(self.device_blocks(), min(sum(per), 2 * self.max_batch_size * max(per)))

    def cache_config(self, device_blocks: int, host_blocks: int) -> CacheConfig:
        return CacheConfig(
            tokens_per_block=self.tokens_per_block,
            num_device_blocks=device_blocks,
            num_host_blocks=host_blocks,
            enable_block_reuse=self.enable_block_reuse,
            enable_kv_events=False,  # nobody subscribes in a simulation: build no event objects
        )

    def sim_speculation(self, cache: CacheConfig) -> SimSpeculation | None:
        """A fresh acceptance model (same seed: every policy sees the same per-request rates), the draft's
        roofline and its cache (the main cache's config: the scheduler mirrors one onto the other)."""
        spec = self.speculation
        if spec is None:
            return None
        draft = spec.draft_spec(self.model)
        draft_cost = None
        if draft is not None:
            draft_cost = RooflineCostModel(
                draft,
                self.gpu,
                tp=self.tp,
                step_overhead=spec.draft_overhead,
                overlap_copies=self.overlap_copies,
            )
        return SimSpeculation(
            spec.num_speculative_tokens,
            DrawnAcceptance(spec.acceptance_rate, spec.acceptance_spread, spec.seed),
            draft_cost,
            None if draft is None else cache,
            self.draft_block_bytes,
        )

    def simulator(self, specs: Sequence[RequestSpec], policy: str, **kwargs: Any) -> Simulator:
        kind, extra = parse_policy(policy)
        if kind == "oracle":
            kind, cache = "unified", self.cache_config(self.oracle_blocks(specs), 0)
        else:
            cache = self.cache_config(self.device_blocks(), self.host_blocks())
        return Simulator(
            specs,
            self.cost_model(),
            cache,
            scheduler=kind,
            block_bytes=self.block_bytes,
            slo=self.slo,
            name=policy,
            num_replicas=self.num_replicas,
            router=self.router,
            lora_pages=(self.lora_max_pages, self.lora_pages_per_adapter) if self.lora_max_pages else None,
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            chunk_unit_size=self.chunk_unit_size,
            priority_mode=self.priority_mode,
            speculation=self.sim_speculation(cache),
            **extra,
            **kwargs,
        )
