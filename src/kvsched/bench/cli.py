"""`kvsched bench ...`: benchmark commands. Each subcommand imports its implementation lazily.

To add one, write ``_add_<name>(sub)`` that registers a subparser with ``set_defaults(func=...)`` and
call it from :func:`add_parser`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: offline engine throughput, serving load")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda _args: bench.print_help() or 2)
    _add_offline(sub)
    _add_serve(sub)


def _add_offline(sub: argparse._SubParsersAction) -> None:
    from kvsched.bench.offline import add_arguments  # torch-free: only flags

    parser = sub.add_parser(
        "offline",
        help="run the built-in chat prompts through the engine (default SmolLM2-135M) and print a table",
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_offline)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from kvsched.bench.serve_cli import add_serve_bench_parser  # flags only; httpx loads at run time

    add_serve_bench_parser(sub)


def _run_offline(args: argparse.Namespace) -> int:
    from kvsched.bench.offline import run  # imports torch and the engine

    return run(args)
