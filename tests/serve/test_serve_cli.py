"""`kvsched serve` flags: server options plus every engine flag; the served name."""

from __future__ import annotations

from kvsched.cli import build_parser
from kvsched.serve.cli import DEFAULT_MODEL_NAME, served_name


def test_flags_parse() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "9001",
            "--max-waiting",
            "5",
            "--num-device-blocks",
            "64",
            "--scheduler",
            "two-stage",
        ]
    )
    assert (args.port, args.host, args.max_waiting) == (9001, "127.0.0.1", 5)
    assert (args.num_device_blocks, args.scheduler, args.model) == (64, "two-stage", None)


def test_served_name() -> None:
    assert served_name(None, None) == DEFAULT_MODEL_NAME
    assert served_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf", None) == "SmolLM2-135M-Instruct.Q4_1"
    assert served_name("/models/llama-tiny/", None) == "llama-tiny"
    assert served_name("/x.gguf", "mine") == "mine"
