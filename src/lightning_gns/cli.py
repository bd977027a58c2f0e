"""The ``lightning-gns`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_gns import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per job."""
    parser = argparse.ArgumentParser(prog="lightning-gns", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lightning-gns {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0
