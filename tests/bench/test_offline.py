"""`kvsched bench offline`: flags, the report table, and a run on the tiny checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvsched.bench import serve_cli
from kvsched.bench.offline import run_offline
from kvsched.bench.prompts import SHARED_SYSTEM_PROMPT, chat_conversations
from kvsched.cli import build_parser


def test_bench_offline_flags_and_serve_registered():
    parser = build_parser()
    args = parser.parse_args(["bench", "offline", "--num-prompts", "8", "--scheduler", "recompute"])
    assert args.num_prompts == 8 and args.scheduler == "recompute" and args.max_tokens == 64
    assert (args.device_kv_bytes, args.host_kv_bytes) == (128 << 20, 1 << 30)  # bench defaults, not None
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "offline", "--scheduler", "nope"])
    assert parser.parse_args(["bench", "serve"]).func is serve_cli.run  # not `bench`'s print-help default


@pytest.mark.parametrize(
    ("argv", "shown"), [(["bench", "--help"], "offline"), (["bench", "offline", "--help"], "--num-prompts")]
)
def test_bench_help_does_not_import_torch(argv, shown):
    # Registration imports only the flags; torch and the engine load when the job runs.
    code = (
        "import sys\nfrom kvsched.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('kvsched.engine.llm')))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert shown in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_built_in_prompts_are_varied_and_share_a_system_prompt():
    convs = chat_conversations(64)
    assert len({c[-1]["content"] for c in convs}) == 64
    assert sum(c[0]["content"] == SHARED_SYSTEM_PROMPT for c in convs) >= 16
    assert len(chat_conversations(100)) == 100


def test_run_offline_on_the_tiny_model(tiny_llama_dir, capsys):
    from kvsched.engine.llm import LLM  # torch: only this test needs it (tiny_llama_dir skips without it)

    llm = LLM(str(tiny_llama_dir), max_batch_size=2, num_device_blocks=64)
    convs = chat_conversations(6)
    for c in convs:  # one token per byte: shorten the shared system prompt to fit 512 positions
        c[0]["content"] = c[0]["content"][:300]
    report = run_offline(llm, num_prompts=6, max_tokens=24, use_tqdm=False, conversations=convs)
    assert report.num_requests == 6 and report.output_tokens == 6 * 24
    assert len(report.ttft_s) == 6 and len(report.tpot_s) == 6
    assert report.reuse_hit_rate > 0
    print(report.table())
    table = capsys.readouterr().out
    for label in (
        "Output tokens/s",
        "TTFT p50 / p99",
        "TPOT p50 / p99",
        "Suspends / resumes",
        "Prefix reuse",
    ):
        assert label in table
