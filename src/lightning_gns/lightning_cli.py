"""``GNSLightningCLI``: the ``LightningCLI`` behind ``lightning-gns fit`` and the demo.

Its own module, below both :mod:`lightning_gns.cli` (the command line) and :mod:`lightning_gns.demo.runner` (which
builds the demo runs through it), so that neither imports the other's module to reach it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["GNSLightningCLI"]


class _ConciseErrorParser(LightningArgumentParser):
    """On a bad argument or config, one usage line rather than the ~60 of every Trainer option, then the error."""

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        """Print the one-line usage (the options are in ``--help``)."""
        prog = self.prog.replace(" [options]", "")
        (file or sys.stdout).write(f"usage: {prog} [--config CONFIG] [options]\n")


class GNSLightningCLI(LightningCLI):
    """A ``LightningCLI`` over any LightningModule and LightningDataModule, the one behind ``lightning-gns fit``.

    Model and data are given by class path (``model.class_path``, ``data.class_path``), the monitor as a callback
    (``trainer.callbacks``); ``configs/`` holds one file per demo task. On top of a plain ``LightningCLI`` it

    - links ``data.vocab_size`` to ``model.init_args.vocab_size`` when the data module has that attribute (the
      character language model), so that a config never spells out a vocabulary that depends on the corpus;
    - writes the run's ``config.yaml`` into the log directory, overwriting the one of an earlier run there;
    - on a bad option prints one usage line and the error (jsonargparse's message names the key), not the
      usage of every Trainer option.

    Any other ``LightningCLI`` takes the monitor the same way:
    ``--trainer.callbacks+=lightning_gns.NoiseScaleMonitor --trainer.callbacks.source=per_example``.

    Args:
        args: command-line arguments (``None``: ``sys.argv[1:]``) or a config as a ``dict``.
        run: run the sub-command (``fit``, ``validate``, ...) named first in ``args``; ``False`` only builds the
            trainer, model and data module from a config without a sub-command.
        **kwargs: passed on to ``LightningCLI`` (for example ``trainer_defaults``).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _ConciseErrorParser)
        super().__init__(args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's vocabulary size to the model's, where both have one."""
        # jsonargparse skips the link when the instantiated data module has no `vocab_size` attribute.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (a list of strings, or a config as a ``dict``), or ``sys.argv[1:]`` when ``None``."""
        # LightningCLI warns when both `args` and `sys.argv` have arguments; under `lightning-gns fit` both always
        # do (main() passes the argv it was given on), so parse without that warning.
        if isinstance(args, dict | Namespace):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
