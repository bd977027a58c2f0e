"""``lightning-gns report RUN_DIR``: the report of a run from its logs, with one-line errors and an exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_gns import tags
from lightning_gns.report.reading import LOG_CHOICES

HELP = "plots and a report (report.md, report.html) from a run's TensorBoard or CSV logs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-command's arguments, on the parser that ``cli.py`` made for it."""
    parser.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a logger's version directory, a parent holding one run, or a log file (searched recursively)",
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR/report)")
    parser.add_argument(
        "--logs",
        choices=LOG_CHOICES,
        default="auto",
        help="which logs to read: auto (TensorBoard if any, else CSV), tensorboard or csv",
    )
    parser.add_argument(
        "--prefix", default=tags.DEFAULT_PREFIX, help=f"the monitor's log_key_prefix (default: {tags.DEFAULT_PREFIX})"
    )


def run(args: argparse.Namespace) -> int:
    """Write the report; print where it went (stdout) or one line on what is wrong (stderr). The exit code."""
    from lightning_gns.report.build import make_report
    from lightning_gns.report.errors import ReportError

    try:
        out = make_report(args.run_dir, out_dir=args.out, logs=args.logs, prefix=args.prefix)
    except (ReportError, ModuleNotFoundError) as err:
        print(f"lightning-gns report: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the report directory cannot be written, a log file cannot be opened
        print(f"lightning-gns report: error: {err.filename or args.run_dir}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"report: {out / 'report.md'}")
    print(f"        {out / 'report.html'}")
    for figure in sorted(out.glob("*.png")):
        print(f"figure: {figure}")
    return 0
