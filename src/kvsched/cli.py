"""`kvsched ...`: one entry point; each area registers its own subcommands.

Subcommand modules are imported only when present and only their ``add_parser`` runs at start-up,
so `kvsched sim` works without torch installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description). Each module defines `add_parser(subparsers) -> None` that registers one or
# more subcommands with `set_defaults(func=...)`.
_COMMAND_MODULES = (
    "kvsched.core.demo_cli",
    "kvsched.engine.cli",
    "kvsched.sim.cli",
    "kvsched.serve.cli",
    "kvsched.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsched", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the area does not exist yet; a missing dependency is a real error
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
