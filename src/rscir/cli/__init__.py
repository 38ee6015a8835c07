"""The ``rscir`` command line: one subcommand module per capability under ``rscir.cli``.

Argument parsing lives here only; the modules call the library and print. Every error rscir
raises on purpose is an :class:`~rscir.errors.RscirError`: printed as one line, exit status 2;
so is a missing optional package (naming the ``pip install 'rscir[EXTRA]'`` to run).

Start-up is kept short: the command modules import nothing heavy at module level (torch,
transformers, FAISS, scikit-image are imported by the code that uses them), so ``rscir --help``
and a search that needs no model load only what they use (``benchmarks/cli_latency.py``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import RscirError
from . import ann, bench, core, imports, serve, store, train
from .extras import hint_for

COMMAND_MODULES = (core, imports, store, bench, train, ann, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rscir",
        description="Composed image retrieval (image + text modifier) for remote-sensing archives.",
    )
    p.add_argument("--version", action="version", version=f"rscir {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMAND_MODULES:
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except BrokenPipeError:  # e.g. `rscir search ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("rscir: interrupted", file=sys.stderr)
        return 130
    except (RscirError, OSError) as e:
        # rscir's own errors say how to fix them; an OSError is the file system's answer about
        # a path the user gave (permission, disk full). Anything else is a bug: a traceback.
        if args.verbose:
            raise
        print(f"rscir {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional package that is not installed: name its extra
        hint = hint_for(e, f"rscir {args.command}")
        if hint is None or args.verbose:
            raise
        print(f"rscir {args.command}: error: {hint}", file=sys.stderr)
        return 2
    return int(rc or 0)

