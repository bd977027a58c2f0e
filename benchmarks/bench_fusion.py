"""Weight-gradient fusion of the ``per_example`` engine: is ``fuse_weight_grads=True`` worth being the default?

A rule that builds the per-example weight gradients of a layer anyway (a convolution, a GroupNorm, a Linear on
sequences long against its width: :func:`~lightning_gns.sources.rules.linear.linear_fuses_weight_grads`) can hand
autograd their sum, and autograd then skips that layer's weight gradient (``fuse_weight_grads=True``, the
default). This script measures what that saves, on three models:

- ``cnn``: Conv2d + GroupNorm, 32x32 images (every convolution and GroupNorm fuses);
- ``seq``: a causal transformer built of ``nn.Linear`` layers on long sequences (every Linear fuses on CPU);
- ``mlp``: Linear layers on 2-D inputs, where nothing fuses: the control, on-vs-off should be 1.

For each it times three ways to run one training step's forward and backward on the same weights:

- ``plain``: ``zero_grad``, the loss, ``backward()``, no engine;
- ``fused``: the same with :class:`~lightning_gns.sources.per_example_norms.PerExampleGradNorms` attached,
  ``fuse_weight_grads=True``, its record popped;
- ``unfused``: the same with ``fuse_weight_grads=False``.

Protocol (as ``bench_models.py``): at the initial weights, one step of each on its own copy; the ``.grad`` of
``fused`` and ``unfused`` against ``plain`` (the largest ``|g - g_plain|`` over the largest ``|g_plain|``; ``unfused``
must be bit-for-bit equal), the layers that fused (their weight reads ``requires_grad=False`` inside their
forward), and the peak memory of the step (``bench_overhead.measure_peak_bytes``: on CPU the peak of live tensor
bytes created by the step's ATen ops, a lower bound; on CUDA the allocator's peak). Then ``--warmup`` steps per
method and ``--repeats`` interleaved rounds, each running every method ``--inner`` steps in an order that rotates
from round to round; the ratios (to ``plain``, and ``fused`` to ``unfused``) are taken within each round and their
median and interquartile range over rounds are reported.

Writes ``fusion.md`` and ``fusion.json`` into ``--out`` (default ``benchmarks/results``; with ``--quick`` a
temporary folder unless ``--out`` is given).

Usage::

    python benchmarks/bench_fusion.py --threads 1    # batch 32 CNN at 32x32, T=256 width 128, MLP width 512
    python benchmarks/bench_fusion.py --quick        # tiny sizes, 2 rounds: a smoke test of a few seconds
    python benchmarks/bench_fusion.py --models cnn --repeats 15 --threads 1
    ./run bench-fusion [args]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_info
from bench_overhead import _fmt, _quartiles, measure_peak_bytes
from lightning_gns.sources.per_example_norms import PerExampleGradNorms

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("plain", "fused", "unfused")
MODELS = ("cnn", "seq", "mlp")
FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)


@dataclass(frozen=True)
class Sizes:
    batch: int = 32  # cnn
    image: int = 32
    channels: int = 64
    seq_batch: int = 8
    seq: int = 256
    width: int = 128
    layers: int = 2
    vocab: int = 256
    mlp_batch: int = 128
    mlp_width: int = 512


QUICK = Sizes(
    batch=4, image=8, channels=8, seq_batch=2, seq=32, width=16, layers=1, vocab=32, mlp_batch=4, mlp_width=32
)


# ------------------------------------------------------------------------------------------------------- models


class CNN(nn.Module):
    """Four 3x3 convolutions (two of stride 2), each followed by GroupNorm and ReLU, then a linear head."""

    def __init__(self, channels: int, classes: int = 10) -> None:
        super().__init__()
        half = channels // 2
        self.features = nn.Sequential(
            nn.Conv2d(3, half, 3, padding=1),
            nn.GroupNorm(4, half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 3, stride=2, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention (q, k, v and out as ``nn.Linear``) and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        a = self.ln1(h)
        q, k, v = (proj(a).view(n, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        h = h + self.out(att)
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class SeqModel(nn.Module):
    """A causal language model of ``Block``s: token and position embeddings, blocks, LayerNorm, a Linear head."""

    def __init__(self, vocab: int, width: int, layers: int, length: int, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        h = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device).expand(n, t))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class MLP(nn.Module):
    """Three hidden Linear layers on flat inputs: nothing to fuse (a single position per example)."""

    def __init__(self, width: int, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor

    def loss(self, model: nn.Module) -> Tensor:
        out = model(self.inputs)
        if out.dim() == 3:  # next-token loss, a mean over the batch's tokens
            return F.cross_entropy(out[:, :-1].flatten(0, 1), self.targets[:, 1:].flatten())
        return F.cross_entropy(out, self.targets)


def make_model(name: str, s: Sizes, device: torch.device) -> Model:
    """The model ``name`` at sizes ``s`` with its seeded synthetic batch, in float32 on ``device``."""
    torch.manual_seed(0)
    if name == "cnn":
        model: nn.Module = CNN(s.channels)
        x = torch.randn(s.batch, 3, s.image, s.image)
        y = torch.randint(0, 10, (s.batch,))
        desc = f"Conv2d + GroupNorm CNN, {s.image}x{s.image} images, channels {s.channels // 2}-{s.channels}"
        desc += f", batch {s.batch}"
    elif name == "seq":
        model = SeqModel(s.vocab, s.width, s.layers, s.seq)
        x = torch.randint(0, s.vocab, (s.seq_batch, s.seq))
        y = x
        desc = f"causal transformer of nn.Linear, T={s.seq}, width {s.width}, {s.layers} blocks, vocab {s.vocab}"
        desc += f", batch {s.seq_batch}"
    elif name == "mlp":
        model = MLP(s.mlp_width)
        x = torch.randn(s.mlp_batch, s.mlp_width)
        y = torch.randint(0, 10, (s.mlp_batch,))
        desc = f"MLP, 3 hidden Linear of width {s.mlp_width} on flat inputs, batch {s.mlp_batch}"
    else:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")
    n_params = sum(p.numel() for p in model.parameters())
    return Model(name, f"{desc}, {n_params:,} parameters", model.float().to(device).train(), x.to(device), y.to(device))


# ------------------------------------------------------------------------------------------------------- methods

StepFn = Callable[[], object]


def _zero_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def make_step(spec: Model, model: nn.Module, method: str) -> tuple[StepFn, Callable[[], None]]:
    """One training step's forward and backward for ``method`` on ``model``, and how to detach the engine."""
    if method == "plain":

        def plain() -> None:
            _zero_grad(model)
            spec.loss(model).backward()

        return plain, lambda: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are the tests' business, not the timing's
        engine = PerExampleGradNorms(model, fuse_weight_grads=method == "fused", strict=False).attach()

    def measured() -> Tensor:
        _zero_grad(model)
        spec.loss(model).backward()
        records = engine.pop()
        if len(records) != 1:
            raise RuntimeError(f"Expected one record per backward pass, got {len(records)}.")
        return records[0].sq_norms

    return measured, engine.remove


# ------------------------------------------------------------------------------------------------------- protocol


@dataclass
class Row:
    model: str
    method: str
    status: str = "ok"  # ok | error
    detail: str = ""
    step_ms: float = float("nan")
    step_ms_iqr: tuple[float, float] = (float("nan"), float("nan"))
    ratio: float = float("nan")  # to plain, within each round
    ratio_iqr: tuple[float, float] = (float("nan"), float("nan"))
    ratio_unfused: float = float("nan")  # fused to unfused, within each round (fused row only)
    ratio_unfused_iqr: tuple[float, float] = (float("nan"), float("nan"))
    grad_rel_diff: float = float("nan")  # max |g - g_plain| / max |g_plain|, both over every parameter
    grad_bitwise_equal: bool | None = None  # .grad torch.equal to plain autograd's, every parameter
    fused_layers: int = 0  # layers whose weight read requires_grad=False inside their forward
    fusable_layers: int = 0  # Linear, Conv*d and GroupNorm layers with a trainable weight
    peak_mib: float = float("nan")
    times_ms: list[float] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def compare_grads(got: dict[str, Tensor | None], plain: dict[str, Tensor | None]) -> tuple[float, bool]:
    """``max_p max|got_p - plain_p|`` over ``max_p max|plain_p|``, and whether every ``.grad`` is bit-for-bit equal.

    The scale is the model's largest gradient entry, not each parameter's own: a parameter whose gradient is zero
    but for rounding (a convolution's bias before a GroupNorm of one channel per group) would make any order of
    summation look wrong.
    """
    diff, scale, equal = 0.0, 0.0, True
    for name, expected in plain.items():
        value = got[name]
        if expected is None or value is None:
            if (expected is None) != (value is None):
                return float("inf"), False
            continue
        equal = equal and torch.equal(value, expected)
        scale = max(scale, float(expected.abs().max()))
        diff = max(diff, float((value.double() - expected.double()).abs().max()))
    return (diff / scale if scale > 0 else diff), equal


def check_step(spec: Model, method: str, device: torch.device) -> tuple[dict[str, Tensor | None], int, int, int]:
    """One step on a fresh copy: its ``.grad``, the fused and fusable layer counts, and its peak bytes."""
    model = copy.deepcopy(spec.model)
    seen: list[bool] = []
    handles = [
        m.register_forward_hook(lambda m, args, out: seen.append(not m.weight.requires_grad))
        for m in model.modules()
        if isinstance(m, FUSABLE) and isinstance(getattr(m, "weight", None), Tensor) and m.weight.requires_grad
    ]
    step, close = make_step(spec, model, method)
    try:
        step()
        grads = _grads(model)
        for h in handles:
            h.remove()
        peak = measure_peak_bytes(step, device)
    finally:
        close()
    return grads, sum(seen), len(handles), peak


def run_model(spec: Model, device: torch.device, *, repeats: int, inner: int, warmup: int) -> list[Row]:
    rows = {m: Row(spec.name, m) for m in METHODS}
    plain_grads: dict[str, Tensor | None] | None = None
    for method in METHODS:
        row = rows[method]
        try:
            grads, row.fused_layers, row.fusable_layers, peak = check_step(spec, method, device)
        except Exception as exc:  # a failure is a finding to report, not a crash
            row.status, row.detail = "error", _first_line(exc)
            continue
        row.peak_mib = peak / 2**20
        if method == "plain":
            plain_grads = grads
        elif plain_grads is not None:
            row.grad_rel_diff, row.grad_bitwise_equal = compare_grads(grads, plain_grads)
    runners: dict[str, tuple[StepFn, Callable[[], None]]] = {}
    for method in METHODS:
        if rows[method].status != "ok":
            continue
        try:
            runner = make_step(spec, copy.deepcopy(spec.model), method)
            for _ in range(warmup):
                runner[0]()
        except Exception as exc:
            rows[method].status, rows[method].detail = "error", _first_line(exc)
            continue
        runners[method] = runner
    order = list(runners)
    times: dict[str, list[float]] = {m: [] for m in order}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(repeats):
        shift = r % max(1, len(order))
        for method in order[shift:] + order[:shift]:
            if method not in runners:
                continue
            step = runners[method][0]
            try:
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    step()
                sync()
                times[method].append((time.perf_counter() - start) / inner)
            except Exception as exc:  # a method that fails only later is as unsupported
                rows[method].status, rows[method].detail = "error", _first_line(exc)
                runners.pop(method)[1]()
    for method, (_, close) in runners.items():
        close()
        row = rows[method]
        row.times_ms = [1e3 * t for t in times[method]]
        q1, q2, q3 = _quartiles(row.times_ms)
        row.step_ms, row.step_ms_iqr = q2, (q1, q3)
        if "plain" in runners:
            r1, r2, r3 = _quartiles([t / b for t, b in zip(times[method], times["plain"], strict=True)])
            row.ratio, row.ratio_iqr = r2, (r1, r3)
    if "fused" in runners and "unfused" in runners:
        r1, r2, r3 = _quartiles([f / u for f, u in zip(times["fused"], times["unfused"], strict=True)])
        rows["fused"].ratio_unfused, rows["fused"].ratio_unfused_iqr = r2, (r1, r3)
    return [rows[m] for m in METHODS]


# ------------------------------------------------------------------------------------------------------- report


def _range(value: float, iqr: tuple[float, float], spec: str) -> str:
    if value != value:
        return "–"
    return f"{_fmt(value, spec)} [{_fmt(iqr[0], spec)}, {_fmt(iqr[1], spec)}]"


def _grad_cell(r: Row) -> str:
    if r.method == "plain" or r.grad_bitwise_equal is None:
        return "–"
    return "bit-for-bit" if r.grad_bitwise_equal else _fmt(r.grad_rel_diff, ".1e")


def to_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# Weight-gradient fusion of the per_example engine: fused against unfused against a plain step",
        "",
        f"- Run: {meta['date']}, `{meta['command']}`",
        f"- Device: {meta['device']}; torch threads: {meta['threads']}; 1-minute load average "
        f"{meta['load_average_at_start']:.2f} at the start, {meta['load_average_at_end']:.2f} at the end",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Sizes: {meta['sizes']}; float32, train mode",
        f"- Protocol: {meta['warmup']} warm-up steps per method, then {meta['repeats']} interleaved rounds of "
        f"{meta['inner']} steps each (zero_grad + forward + backward, no optimizer step), on the same initial "
        "weights. Times and ratios are the median [interquartile range] over rounds; a ratio is taken within "
        "each round.",
        "- `fused`: `PerExampleGradNorms(model, fuse_weight_grads=True)` (the default); `unfused`: "
        "`fuse_weight_grads=False`. '× unfused' is fused / unfused within each round.",
        "- '.grad vs plain': one step at the initial weights, the largest |g − g_plain| over the largest "
        "|g_plain|, both over every parameter ('bit-for-bit': `torch.equal` on every parameter). "
        "'fused layers': Linear / Conv / GroupNorm layers whose weight gradient came from the rule, of those "
        "with a trainable weight.",
        f"- Peak memory: {meta['memory']}",
        "",
        "Models:",
        "",
    ]
    lines += [f"- `{name}`: {desc}" for name, desc in meta["models"].items()]
    lines += [
        "",
        "| model | method | ms / step | × plain | × unfused | .grad vs plain | fused layers | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r.status if r.status == "ok" else f"{r.status}: {r.detail}".replace("|", "\\|")
        fused = f"{r.fused_layers} / {r.fusable_layers}" if r.status == "ok" else "–"
        lines.append(
            f"| {r.model} | {r.method} | {_range(r.step_ms, r.step_ms_iqr, '.1f')} "
            f"| {_range(r.ratio, r.ratio_iqr, '.2f')} | {_range(r.ratio_unfused, r.ratio_unfused_iqr, '.2f')} "
            f"| {_grad_cell(r)} | {fused} | {_fmt(r.peak_mib, '.1f')} | {status} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {MODELS}")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK}), 2 rounds: a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15; quick 2)")
    parser.add_argument("--inner", type=int, default=None, help="steps per method per round (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 2; quick 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 on a shared machine)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", type=Path, default=None, help="folder for fusion.{md,json}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark from the command line; see ``--help``."""
    args = _parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    repeats = args.repeats or (2 if args.quick else 15)
    inner = args.inner or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.set_flush_denormal(True)
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"Unknown models {unknown}; expected some of {list(MODELS)}.")
    out = args.out or (Path(tempfile.gettempdir()) / "lightning-gns-fusion-quick" if args.quick else RESULTS_DIR)

    load_at_start = run_info.load_average()
    rows: list[Row] = []
    descriptions: dict[str, str] = {}
    for name in names:
        spec = make_model(name, sizes, device)
        descriptions[name] = spec.description
        start = time.perf_counter()
        rows += run_model(spec, device, repeats=repeats, inner=inner, warmup=warmup)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)

    if device.type == "cuda":
        where = f"CUDA ({torch.cuda.get_device_name(device)})"
        memory = "`torch.cuda.max_memory_allocated` of one step, above what was allocated before it."
    else:
        where = f"CPU ({run_info.cpu_name()}, {os.cpu_count()} cores)"
        memory = (
            "the peak of live tensor bytes created by one step's ATen ops (`bench_overhead.measure_peak_bytes`): "
            "a lower bound that ignores allocator caching and what libraries allocate outside ATen ops."
        )
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": where,
        "load_average_at_start": load_at_start,
        "load_average_at_end": run_info.load_average(),
        "threads": torch.get_num_threads(),
        "versions": run_info.versions(("torch", "lightning-gns"), with_commit=True),
        "sizes": asdict(sizes),
        "repeats": repeats,
        "inner": inner,
        "warmup": warmup,
        "memory": memory,
        "models": descriptions,
    }
    report = to_markdown(rows, meta)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion.md").write_text(report)
    (out / "fusion.json").write_text(
        json.dumps(run_info.json_safe({"meta": meta, "results": [asdict(r) for r in rows]}), indent=2) + "\n"
    )
    return rows


if __name__ == "__main__":
    main()
