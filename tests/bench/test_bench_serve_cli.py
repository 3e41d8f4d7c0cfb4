"""`kvsched bench serve` reports its errors through the one entry-point handler: one line, status 2."""

from __future__ import annotations

import socket

from kvsched.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_an_unreachable_server_is_one_line_and_status_2(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["bench", "serve", "--base-url", url, "--num-prompts", "1", "--disable-tqdm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvsched: error: cannot list models at")
    assert err[0].endswith("pass --model")


def test_bad_percentiles_name_the_flag(capsys):
    args = ["bench", "serve", "--model", "m", "--metric-percentiles", "50,x", "--num-prompts", "1"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "kvsched: error: --metric-percentiles '50,x' is invalid: use numbers like 50,90,99"
    )
