"""`kvsched` entry point: typed errors are one line and status 2, bugs keep their traceback, --version."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import kvsched
from kvsched import cli
from kvsched.core.errors import ConfigError, UnknownRequestError


def _with_command(monkeypatch: pytest.MonkeyPatch, func) -> None:
    """Register a `boom` subcommand that runs `func` (the real commands need a model or a trace)."""
    real = cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = real()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.add_parser("boom").set_defaults(func=func)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)


def test_a_typed_error_is_one_line_and_status_2(monkeypatch, capsys):
    def fail(_args):
        raise ConfigError("max_batch_size=0 is invalid:\n  must be an integer >= 1")

    _with_command(monkeypatch, fail)
    assert cli.main(["boom"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "kvsched: error: max_batch_size=0 is invalid: must be an integer >= 1\n"


def test_a_key_error_subclass_is_not_printed_quoted(monkeypatch, capsys):
    def fail(_args):
        raise UnknownRequestError("request 7 is not known")

    _with_command(monkeypatch, fail)
    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err == "kvsched: error: request 7 is not known\n"


def test_other_exceptions_are_bugs_and_propagate(monkeypatch):
    def fail(_args):
        raise ZeroDivisionError("a bug")

    _with_command(monkeypatch, fail)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["boom"])


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    _with_command(monkeypatch, interrupted)
    assert cli.main(["boom"]) == 130
    assert capsys.readouterr() == ("", "")


def test_a_command_status_is_returned(monkeypatch):
    _with_command(monkeypatch, lambda _args: 3)
    assert cli.main(["boom"]) == 3


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"kvsched {cli.version()}\n"
    assert cli.version() == kvsched.__version__


def test_version_falls_back_to_the_package_when_not_installed(monkeypatch):
    def missing(_name):
        raise cli.importlib.metadata.PackageNotFoundError("kvsched")

    monkeypatch.setattr(cli.importlib.metadata, "version", missing)
    assert cli.version() == kvsched.__version__


def test_sim_errors_go_through_the_entry_point(capsys):
    assert cli.main(["sim", "--synthetic", "--sweep-rates", "1,fast", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "kvsched: error: --sweep-rates '1,fast' is invalid: comma-separated floats expected\n"
    )


def test_serve_errors_go_through_the_entry_point(capsys):
    pytest.importorskip("uvicorn")
    assert cli.main(["serve", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched: error: max_batch_size=0 is invalid") and err.count("\n") == 1


def test_generate_with_a_missing_model_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nonexistent"
    proc = subprocess.run(
        [sys.executable, "-m", "kvsched.cli", "generate", "--model", str(missing), "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"kvsched: error: model path not found: {missing}"]
    assert proc.stdout == ""
