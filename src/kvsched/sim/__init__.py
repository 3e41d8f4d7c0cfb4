"""The simulator: the production scheduler and KV manager (metadata only) driven by a GPU cost model.

Pieces (each module has one job):
  hardware.py   GPU presets (peaks x efficiency factors, sources) and user JSON files
  models.py     model presets from HF-style configs (bytes, FLOPs, KV bytes per token), user config.json
  cost.py       StepShape (a batch as sums), RooflineCostModel, LinearCostModel (fitted to measurements)
  calibration.py  GemmProfile (an engine's forward per row count) and fit_copy_cost: LinearCostModel's inputs
  lora.py       LoraSpec: an adapter's FLOPs per token and bytes (reads per step, host->device loads)
  workload.py   RequestSpec (token segments, so prefix sharing is exact), time scaling
  trace.py      Mooncake JSONL replay (512-token hash blocks expanded to token ids); the shipped trace
  data/         the Mooncake conversation trace (gzip, Apache-2.0, kvcache-ai/Mooncake) and its README
  synthetic.py  Poisson/gamma arrivals, length distributions, system prompts, conversations, LoRA mix
  storage.py    a metadata-only KV storage backend that counts copied blocks per direction
  replica.py    one serving instance: the engine's step loop (core/loop.py), its runner the cost model
  simulator.py  Simulator: arrivals by timestamp, replicas behind a router, SimResult
  scenario.py   model x GPU x TP x memory split x budgets -> simulators per policy (oracle included)
  metrics.py    TTFT/TPOT/ITL/E2E, throughput, goodput, KV usage over time
  report.py, plots.py, cli.py   table + JSON, PNG plots, `kvsched sim`

Example::

    from kvsched.sim.scenario import Scenario
    from kvsched.sim.hardware import GPU_PRESETS
    from kvsched.sim.models import MODEL_PRESETS
    from kvsched.sim.trace import load_mooncake

    sc = Scenario(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"], host_memory_gb=200)
    specs = load_mooncake(limit=500)  # the shipped trace; or a path to a .jsonl / .jsonl.gz
    print(sc.simulator(specs, "unified").run().summary["goodput"])
"""
