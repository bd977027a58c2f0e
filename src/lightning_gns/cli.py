"""The ``lightning-gns`` command line: ``demo`` trains the bundled tasks with the monitor; ``report`` plots a run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_gns import __version__
from lightning_gns.report import command as report_command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per job."""
    parser = argparse.ArgumentParser(prog="lightning-gns", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lightning-gns {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="train the bundled tasks (digits MLP, character LM) with the monitor")
    demo.add_argument("--task", choices=("digits", "charlm", "all"), default="all")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the logs go (default: runs/demo)")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps per task (default: per task)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress-bar", action="store_true")
    report_command.add_arguments(commands.add_parser("report", help=report_command.HELP))
    return parser


# Digits: long enough for a resolved B_simple, short of the near-zero training loss where |G|² vanishes.
_DEFAULT_STEPS = {"digits": 400, "charlm": 1000}


def _demo(args: argparse.Namespace) -> int:
    try:
        from lightning_gns.demo.runner import TASKS, format_result, run_task
    except ImportError as err:  # scikit-learn is the demo's only extra need
        print(
            f"The demo needs the `demo` extra ({err.name} is missing): pip install 'lightning-gns[demo]'",
            file=sys.stderr,
        )
        return 1
    if args.max_steps is not None and args.max_steps < 1:
        print(f"--max-steps must be >= 1, got {args.max_steps}", file=sys.stderr)
        return 2
    tasks = TASKS if args.task == "all" else (args.task,)
    reports = []
    for task in tasks:
        result = run_task(
            task,
            out_dir=args.out,
            max_steps=args.max_steps or _DEFAULT_STEPS[task],
            batch_size=args.batch_size,
            seed=args.seed,
            progress_bar=not args.no_progress_bar,
        )
        reports.append(format_result(result))
    print("\n".join(reports))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return report_command.run(args)
    parser.print_help()
    return 2


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
