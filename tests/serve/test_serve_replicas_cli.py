"""`kvsched serve --replicas N --router KIND`: flags, and the one-line errors (no Ray installed, an
unsupported combination) that come before any model loads."""

from __future__ import annotations

import sys

import pytest

from kvsched.cli import build_parser, main


def test_replica_flags_parse() -> None:
    args = build_parser().parse_args(["serve", "--replicas", "2", "--router", "Least-Loaded"])
    assert (args.replicas, args.router, args.ray_address) == (2, "least_loaded", None)
    default = build_parser().parse_args(["serve"])
    assert (default.replicas, default.router, default.replica_cpus) == (1, "kv_aware", 1.0)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--replicas", "0"], "must be at least 1, got 0"),
        (["--replicas", "two"], "'two' is not an integer"),
        (["--router", "random"], "'random' is not one of round_robin"),
    ],
)
def test_bad_replica_flags_exit(argv: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
    assert f"argument {argv[0]}: {why}" in capsys.readouterr().err


def test_replicas_without_ray_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["serve", "--replicas", "2", "--model", "/nonexistent/model"]) != 0
    err = capsys.readouterr().err
    assert "pip install 'kvsched[ray]'" in err and "Traceback" not in err


def test_runtime_lora_updates_refused_with_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    argv = ["serve", "--replicas", "2", "--enable-lora-runtime-updates", "--model", "/nonexistent/model"]
    assert main(argv) != 0
    assert "--enable-lora-runtime-updates is not supported with --replicas" in capsys.readouterr().err
