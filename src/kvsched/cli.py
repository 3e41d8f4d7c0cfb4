"""`kvsched ...`: one entry point; each area registers its own subcommands.

Subcommand modules are imported only when present and only their ``add_parser`` runs at start-up,
so `kvsched sim` works without torch installed. Errors are handled here, once, for every command: a
typed kvsched error (bad input, a missing model...) is one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback; Ctrl-C exits 130 without one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from kvsched.core.errors import KVSchedError

# (module, description). Each module defines `add_parser(subparsers) -> None` that registers one or
# more subcommands with `set_defaults(func=...)`.
_COMMAND_MODULES = (
    "kvsched.core.demo_cli",
    "kvsched.engine.cli",
    "kvsched.sim.cli",
    "kvsched.serve.cli",
    "kvsched.bench.cli",
)


#: Exit status of a run stopped by a typed kvsched error (argparse uses 2 for usage errors too).
EXIT_ERROR = 2
#: Exit status after Ctrl-C: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130


def version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    try:
        return importlib.metadata.version("kvsched")
    except importlib.metadata.PackageNotFoundError:
        import kvsched

        return kvsched.__version__


def error_line(exc: KVSchedError) -> str:
    """One line naming the problem (KeyError subclasses would otherwise print their message quoted)."""
    text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return f"kvsched: error: {text}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsched", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvsched {version()}")
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
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except KVSchedError as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
