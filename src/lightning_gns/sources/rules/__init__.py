"""Per-example gradient norm rules, one file per layer family, and the registry that maps layers to them."""

from lightning_gns.sources.rules import registry
from lightning_gns.sources.rules.registry import *  # noqa: F403  # the registry's public names are the package's

__all__ = registry.__all__
