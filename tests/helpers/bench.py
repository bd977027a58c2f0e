"""Loading a benchmark script as a module, for the tests of ``benchmarks/``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@contextmanager
def loaded_bench(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` as the module ``name``, for the duration of the block.

    Loaded from its file: ``benchmarks`` is no package (Opacus installs an unrelated top-level ``benchmarks``).
    """
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
