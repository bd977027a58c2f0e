"""Overhead of per-example gradient norms on a full training step, peers side by side.

For every task of :mod:`models` (beside this file) and every registered method, this script

1. checks the method at the initial weights: its ``[N]`` squared norms against exact float64 ``torch.func`` norms
   (max relative error), the batch gradient it leaves in ``.grad`` against the float64 one, and the parameters it
   leaves out; a method that raises is reported *unsupported* with the error;
2. burns in ``--warmup`` steps, then times full training steps (``zero_grad``, the method's forward and backward,
   ``optimizer.step()``) in interleaved rounds: each round runs every method ``--inner`` steps, in an order that
   rotates from round to round, so that drifts of the machine hit all methods alike. The ratio to the plain step
   is taken within each round, then its median over ``--repeats`` rounds is reported with the interquartile range;
3. measures the peak memory of one step of each method, above what was live before the step.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU there is no
allocator statistic, so a ``TorchDispatchMode`` adds up the bytes of every new tensor storage that an ATen op
creates during the step and frees them when the storage dies (weak references): the peak of live tensor bytes
created by the step (activations, per-example quantities, gradients). It ignores allocator caching and
fragmentation and what libraries allocate outside ATen ops, so it is a lower bound on the resident growth.

Other methods plug in by name: ``register_method("mine", factory)`` with ``factory(model, loss_fn)`` returning a
:class:`peers.Step` (or a bare step function) that fills ``.grad`` and returns the ``[N]`` squared
norms of the per-example loss gradients, or ``None`` when it measures none (then only the time and memory are
compared). ``--plugin some.module`` imports a module that registers its methods before the run (it imports
``from bench_overhead import register_method`` and ``from peers import Step``; this folder is on ``sys.path``).

Usage::

    python benchmarks/bench_overhead.py --quick
    python benchmarks/bench_overhead.py --models mlp,cnn,transformer --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The sibling modules are imported by their own names: `benchmarks` cannot be a package, because Opacus installs an
# unrelated top-level `benchmarks` package into site-packages, and a regular package shadows a namespace one.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_info
from models import TASKS, BenchTask, make_task
from peers import PEERS, MethodFactory, Step, as_step, exact_sq_norms_per_param

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE = "plain"
EXACT_RTOL = 1e-3  # float32 norms against float64 ones: summation-order error is ~1e-6; a missed layer is ≫ 1e-3

METHODS: dict[str, MethodFactory] = dict(PEERS)


def register_method(name: str, factory: MethodFactory, *, overwrite: bool = False) -> None:
    """Add a per-example method to the benchmark.

    Args:
        name: the method's name in the report and in ``--methods``.
        factory: ``(model, loss_fn) -> Step | step function``; it gets its own copy of the model and may attach
            hooks to it. The step runs forward and backward of ``(inputs, targets)``, leaves the batch gradient in
            ``.grad`` and returns ``[N]`` squared per-example gradient norms, or ``None``.
        overwrite: replace a method of the same name instead of raising.

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is false.
    """
    if name in METHODS and not overwrite:
        raise ValueError(f"Expected a new method name, but {name!r} is registered; pass `overwrite=True`.")
    METHODS[name] = factory


# --------------------------------------------------------------------------------------------------- memory


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ATen ops while the mode is active (CPU memory proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view, an in-place op) allocates nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            weakref.finalize(storage, self._free, key, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def measure_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes that ``fn()`` allocates above what was live before it (CUDA: allocator; CPU: live tensors)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    mode = _LiveTensorBytes()
    with mode:
        fn()
    return mode.peak


# --------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Runner:
    """One method's own model copy, optimizer and step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Step

    def full_step(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        self.optimizer.zero_grad(set_to_none=True)
        norms = self.step.fn(inputs, targets)
        self.optimizer.step()
        return norms


@dataclass
class MethodResult:
    """One row of the report."""

    task: str
    method: str
    status: str  # ok | wrong total | unsupported | no norms
    detail: str = ""
    step_ms: float = math.nan
    step_ms_iqr: tuple[float, float] = (math.nan, math.nan)
    ratio: float = math.nan
    ratio_iqr: tuple[float, float] = (math.nan, math.nan)
    peak_mib: float = math.nan
    extra_peak_mib: float = math.nan
    norm_max_rel_err: float = math.nan
    covered_max_rel_err: float = math.nan
    grad_rel_err: float = math.nan
    skipped: list[str] = field(default_factory=list)
    reference: str = REFERENCE


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
            for p in model.parameters()
            if p.requires_grad
        ]
    )


def _max_rel_err(values: Tensor, exact: Tensor) -> float:
    return float(((values.double() - exact).abs() / exact.clamp_min(torch.finfo(torch.float64).tiny)).max())


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def run_task(
    task: BenchTask,
    methods: list[str],
    *,
    device: torch.device,
    repeats: int,
    inner: int,
    warmup: int,
    seed: int,
    lr: float = 1e-3,
) -> list[MethodResult]:
    """Check, time and measure every method on one task; see the module docstring for the protocol."""
    torch.manual_seed(seed)
    base = task.build().to(device)
    x, y = task.inputs, task.targets

    exact_per_param = exact_sq_norms_per_param(base, task.loss_fn, x, y)
    exact = torch.stack(list(exact_per_param.values())).sum(0)
    reference = copy.deepcopy(base).double()
    task.loss_fn(reference(x.double() if x.is_floating_point() else x), y).backward()
    exact_grad = _flat_grad(reference)
    del reference

    results: dict[str, MethodResult] = {}
    runners: list[_Runner] = []
    for name in methods:
        result = results[name] = MethodResult(task.name, name, status="ok")
        model = copy.deepcopy(base)
        try:
            step = as_step(METHODS[name](model, task.loss_fn))
            runner = _Runner(name, model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), step)
            runner.optimizer.zero_grad(set_to_none=True)
            norms = runner.step.fn(x, y)  # at the initial weights: no optimizer step yet
        except Exception as exc:  # any failure of a peer is a finding to report, not a crash
            result.status, result.detail = "unsupported", _first_line(exc)
            continue
        result.grad_rel_err = float((_flat_grad(model) - exact_grad).norm() / exact_grad.norm())
        result.skipped = list(runner.step.skipped)
        if norms is None:
            result.status = "no norms" if name != REFERENCE else "reference"
        else:
            result.norm_max_rel_err = _max_rel_err(norms, exact)
            # The same comparison restricted to the parameters the method covers tells a layer it skips apart
            # from a layer it gets wrong.
            covered = [v for k, v in exact_per_param.items() if k not in result.skipped]
            if covered:
                result.covered_max_rel_err = _max_rel_err(norms, torch.stack(covered).sum(0))
            if result.norm_max_rel_err > EXACT_RTOL or result.skipped:
                result.status = "wrong total"
        runner.optimizer.step()
        runners.append(runner)

    for runner in list(runners):
        try:
            for _ in range(warmup):
                runner.full_step(x, y)
        except Exception as exc:  # a method that fails only once the weights move is as unsupported
            results[runner.name].status, results[runner.name].detail = "unsupported", _first_line(exc)
            runners.remove(runner)
    _sync(device)

    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_index in range(repeats):
        shift = round_index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                runner.full_step(x, y)
            _sync(device)
            times[runner.name].append((time.perf_counter() - start) / inner)

    peaks = {r.name: measure_peak_bytes(partial(r.full_step, x, y), device) for r in runners}
    for runner in runners:
        result = results[runner.name]
        q1, q2, q3 = _quartiles([1e3 * t for t in times[runner.name]])
        result.step_ms, result.step_ms_iqr = q2, (q1, q3)
        result.peak_mib = peaks[runner.name] / 2**20
        reference_name = result.reference = runner.step.reference
        base_times = times.get(reference_name)
        if base_times is not None:
            r1, r2, r3 = _quartiles([t / b for t, b in zip(times[runner.name], base_times, strict=True)])
            result.ratio, result.ratio_iqr = r2, (r1, r3)
            result.extra_peak_mib = (peaks[runner.name] - peaks[reference_name]) / 2**20
        if runner.step.close is not None:
            runner.step.close()
    return [results[name] for name in methods]


# --------------------------------------------------------------------------------------------------- report


def _fmt(value: float, spec: str) -> str:
    return "–" if math.isnan(value) else format(value, spec)


def _status_cell(r: MethodResult) -> str:
    if r.status == "unsupported":
        return f"unsupported: {r.detail}".replace("|", "\\|")
    status = r.status if r.reference == REFERENCE else f"{r.status}; × {r.reference}"
    if r.skipped:
        shown = ", ".join(r.skipped[:4]) + (f", … ({len(r.skipped)} in all)" if len(r.skipped) > 4 else "")
        return f"{status}; misses {shown}"
    return status


def to_markdown(results: list[MethodResult], meta: dict[str, Any]) -> str:
    """The report: a header with the setup, then one table row per task and method."""
    lines = [
        "# Per-example gradient norms: overhead on a full training step",
        "",
        f"- Run: {meta['date']}, `{meta['command']}`",
        f"- Device: {meta['device']}; torch threads: {meta['threads']}; 1-minute load average "
        f"{meta['load_average_at_start']:.2f} at the start, {meta['load_average_at_end']:.2f} at the end",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Protocol: {meta['warmup']} burn-in steps per method, then {meta['repeats']} interleaved rounds of "
        f"{meta['inner']} steps each; a step is zero_grad + forward + backward + SGD step. Times and ratios are the "
        "median [interquartile range] over rounds; a ratio is taken within each round.",
        f"- Memory: {meta['memory']}",
        f"- Norms are checked at the initial weights against float64 `torch.func` norms; 'wrong total' means a max "
        f"relative error above {EXACT_RTOL:g} or parameters left out; 'on covered params' compares with the exact "
        "norms of only the parameters the method covers. 'grad err' is |g − g_exact| / |g_exact| of the batch "
        "gradient that the method leaves for the optimizer.",
        "- '× reference' divides by the plain step unless the status names another reference: a method that "
        "accumulates is divided by the same micro-batches without the measurement; 'extra MiB' is against the same "
        "reference.",
        "",
        "Tasks:",
        "",
    ]
    lines += [f"- `{name}`: {desc}" for name, desc in meta["tasks"].items()]
    lines += [
        "",
        "| task | method | ms / step | × reference | peak MiB | extra MiB | norm max rel err | on covered params "
        "| grad err | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.task} | {r.method} "
            f"| {_fmt(r.step_ms, '.1f')} [{_fmt(r.step_ms_iqr[0], '.1f')}, {_fmt(r.step_ms_iqr[1], '.1f')}] "
            f"| {_fmt(r.ratio, '.2f')} [{_fmt(r.ratio_iqr[0], '.2f')}, {_fmt(r.ratio_iqr[1], '.2f')}] "
            f"| {_fmt(r.peak_mib, '.1f')} | {_fmt(r.extra_peak_mib, '+.1f')} "
            f"| {_fmt(r.norm_max_rel_err, '.1e')} | {_fmt(r.covered_max_rel_err, '.1e')} "
            f"| {_fmt(r.grad_rel_err, '.1e')} | {_status_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- command line


def _parse_list(text: str, known: list[str] | tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in known]
    if unknown:
        raise SystemExit(f"Unknown {what} {unknown}; expected some of {list(known)}.")
    return items


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default=",".join(TASKS), help=f"comma-separated tasks of {TASKS}")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 15; quick 5)")
    parser.add_argument("--inner", type=int, default=None, help="steps per method per round (default 3; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="burn-in steps per method (default 3; quick 2)")
    parser.add_argument("--quick", action="store_true", help="few rounds: about 2 minutes on 2 CPU cores")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:i]")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plugin", action="append", default=[], help="import MODULE to register methods")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for overhead.md and overhead.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[MethodResult]:
    """Run the benchmark from the command line; see ``--help``."""
    args = _parse_args(argv)
    # A plugin does `from bench_overhead import register_method`; run as a script this module is `__main__`, and
    # without the alias that import would load a second copy with a registry of its own.
    sys.modules.setdefault("bench_overhead", sys.modules[__name__])
    for module in args.plugin:
        importlib.import_module(module)
    repeats = args.repeats or (5 if args.quick else 15)
    inner = args.inner or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Denormals slow CPU arithmetic by orders of magnitude and would time the weights, not the method.
    torch.set_flush_denormal(True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tasks = _parse_list(args.models, TASKS, "models")
    methods = _parse_list(args.methods, list(METHODS), "methods") if args.methods else list(METHODS)
    if REFERENCE in methods:  # the reference first, so that its row leads each task
        methods.remove(REFERENCE)
        methods.insert(0, REFERENCE)

    load_at_start = run_info.load_average()
    results: list[MethodResult] = []
    descriptions: dict[str, str] = {}
    for name in tasks:
        task = make_task(name, device=device, seed=args.seed, scale=args.scale)
        n_params = sum(p.numel() for p in task.build().parameters())
        descriptions[name] = f"{task.description}, {n_params:,} parameters"
        start = time.perf_counter()
        rows = run_task(task, methods, device=device, repeats=repeats, inner=inner, warmup=warmup, seed=args.seed)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
        results += rows

    memory = (
        "CUDA allocator peak above the memory live before the step"
        if device.type == "cuda"
        else "CPU proxy: peak bytes of live tensor storages created by ATen ops during one step (a dispatch mode "
        "tracks them), excluding allocator caching; 'extra' is the difference to the plain step"
    )
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({run_info.cpu_name()}, {os.cpu_count()} cores)"
        ),
        # Other processes on the machine distort absolute times; the within-round ratios suffer much less.
        "load_average_at_start": load_at_start,
        "load_average_at_end": run_info.load_average(),
        "threads": torch.get_num_threads(),
        "versions": run_info.versions(("torch", "backpack-for-pytorch", "opacus", "lightning"), with_commit=False),
        "repeats": repeats,
        "inner": inner,
        "warmup": warmup,
        "memory": memory,
        "tasks": descriptions,
    }
    report = to_markdown(results, meta)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.md").write_text(report)
    (args.out / "overhead.json").write_text(
        json.dumps(run_info.json_safe({"meta": meta, "results": [asdict(r) for r in results]}), indent=2) + "\n"
    )
    return results


if __name__ == "__main__":
    main()
