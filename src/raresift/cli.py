"""The `raresift` command. Thin: it parses arguments, calls the library and prints.

Subcommands live in ``raresift.commands.*`` modules, each with a ``register(subparsers)``
function, imported here by name; heavy libraries are imported only inside the command that needs them, so the
command starts fast. Library errors become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import errno
import sqlite3
import sys
from collections.abc import Sequence

from . import __version__
from .commands import core, index, learn, web
from .errors import RaresiftError

# Order = order in `raresift --help`.
COMMAND_MODULES = (core, learn, index, web)

EXIT_ERROR = 2  # raresift refused bad input or state; nothing was lost
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raresift",
        description="Find the images of a rare class in a large unlabeled image collection, "
        "with as few manual labels as possible.",
    )
    parser.add_argument("--version", action="version", version=f"raresift {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except RaresiftError as exc:
        print(f"raresift {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"raresift {args.command}: interrupted; work saved so far is kept, run it again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except (OSError, sqlite3.OperationalError) as exc:
        # Disk full, read-only or vanished folder, locked database: the system's reason in one line.
        # Every batch and label committed before stays committed.
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text:
            text += "; free some space and run the command again, work saved so far is kept"
        print(f"raresift {args.command}: error: {text}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
