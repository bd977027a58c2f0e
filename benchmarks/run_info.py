"""What every benchmark records about the machine it ran on: CPU, load, versions, and strict-JSON values."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def versions(dists: Sequence[str], with_commit: bool = False) -> dict[str, str]:
    """Installed versions of ``dists`` (and python); with ``with_commit``, the repository's commit after ours."""
    found = {"python": platform.python_version()}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    if with_commit and "lightning-gns" in found:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            found["lightning-gns"] += f" (commit {commit})"
        except (OSError, subprocess.CalledProcessError):
            pass
    return found


def json_safe(value: Any) -> Any:
    """Non-finite floats become null (strict JSON has neither NaN nor inf), tuples become lists."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
