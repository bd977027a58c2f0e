"""The ``lightning-gns`` command line.

- ``lightning-gns demo`` trains the bundled tasks (``configs/*.yaml``) with the monitor and prints what it measured.
- ``lightning-gns fit --config configs/digits.yaml`` (and ``validate``) hands its arguments to a LightningCLI over
  any LightningModule and LightningDataModule, with the monitor set up under ``trainer.callbacks``.
- ``lightning-gns report RUN_DIR`` turns a run's logs into figures and a report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_gns import __version__
from lightning_gns.lightning_cli import GNSLightningCLI
from lightning_gns.report import command as report_command

__all__ = ["LIGHTNING_COMMANDS", "GNSLightningCLI", "build_parser", "main", "run"]

#: Sub-commands handed whole to :class:`GNSLightningCLI` (argparse cannot parse LightningCLI's arguments).
LIGHTNING_COMMANDS = ("fit", "validate")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="lightning-gns", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lightning-gns {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="train the bundled tasks (digits MLP, character LM) with the monitor")
    demo.add_argument("--task", choices=("digits", "charlm", "all"), default="all")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the logs go (default: runs/demo)")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps per task (default: the config's)")
    demo.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the config's, 32)")
    demo.add_argument("--seed", type=int, default=None, help="seed of the run (default: the config's, 0)")
    demo.add_argument("--no-progress-bar", action="store_true")
    report_command.add_arguments(commands.add_parser("report", help=report_command.HELP))
    # Listed for --help only: main() hands these to GNSLightningCLI before argparse sees them.
    for name in LIGHTNING_COMMANDS:
        commands.add_parser(name, help=f"LightningCLI `{name}`, e.g. {name} --config configs/digits.yaml (see --help)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    try:
        from lightning_gns.demo.runner import TASKS, format_result, run_task
    except ImportError as err:  # scikit-learn is the demo's only extra need
        print(
            f"The demo needs the `demo` extra ({err.name} is missing): pip install 'lightning-gns[demo]'",
            file=sys.stderr,
        )
        return 1
    for option in ("max_steps", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            print(f"--{option.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    tasks = TASKS if args.task == "all" else (args.task,)
    reports = []
    for task in tasks:
        result = run_task(
            task,
            out_dir=args.out,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            progress_bar=not args.no_progress_bar,
        )
        reports.append(format_result(result) + _demo_report(result.log_dir))
    print("\n".join(reports))
    return 0


def _demo_report(log_dir: Path) -> str:
    """Write the run's report (figures, report.md, report.html) beside its logs; the line that says where."""
    from lightning_gns.report import ReportError, make_report

    try:
        out = make_report(log_dir)
    except (ReportError, ModuleNotFoundError) as err:  # the demo's numbers stand without the figures
        return f"\nReport: not written ({err})"
    return f"\nReport: {out / 'report.html'}"


def _lightning(argv: list[str]) -> int:
    """Run :class:`GNSLightningCLI` on ``argv`` (sub-command first) and return its exit code."""
    try:
        GNSLightningCLI(args=argv)
    except SystemExit as exit_:  # jsonargparse exits on --help and on a bad config (code 2, message on stderr)
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _lightning(argv)
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
