"""Library models: the ``per_example`` engine's overhead against a plain step and against ``torch.func``.

For each model of Hugging Face ``transformers`` (GPT-2, BERT, Llama, ViT) and of ``litgpt`` (a llama-like and a
pythia-like config), built from a config at a realistic width with random weights (nothing is downloaded) and
trained in float32 on the CPU as its users call it (``model(input_ids=ids, labels=ids).loss``, a mean over the
batch's tokens), this script times three ways to run one training step's forward and backward:

- ``plain``: ``zero_grad``, the loss, ``backward()``;
- ``engine``: the same with :class:`~lightning_gns.sources.per_example_norms.PerExampleGradNorms` attached, its
  record popped (``[N]`` squared norms of the examples' loss contributions);
- ``torch_func``: what a peer would write: ``vmap(grad(c_i))`` over the examples with ``functional_call`` (each
  example a batch of one; ``randomness="different"`` where the config keeps dropout on), the squared norms summed
  over every parameter, ``.grad`` set to the sum of the per-example gradients.

Protocol: the engine's norms are first checked against ``torch_func``'s at the initial weights (dropout off:
``eval()``); ``--warmup`` steps per method; then ``--repeats`` interleaved rounds, each running every method
``--inner`` steps in an order that rotates from round to round. The ratio to ``plain`` is taken within each round;
its median and interquartile range over rounds are reported. A method that raises is reported with its error and
the run goes on. ``torch.set_num_threads`` is fixed for the whole run (``--threads``).

Writes ``models_overhead.md`` and ``models_overhead.json`` into ``--out`` (default ``benchmarks/results``; with
``--quick`` a temporary folder unless ``--out`` is given). Needs the extras ``models`` (transformers) and, for the
litgpt models, ``models-litgpt``; a model whose library is missing is listed as skipped.

Usage::

    python benchmarks/bench_models.py                  # hidden 256, T=128, batch 8, 2 layers
    python benchmarks/bench_models.py --quick          # tiny sizes: a smoke test of a few seconds per model
    python benchmarks/bench_models.py --models llama,litgpt_llama --hidden 512 --layers 4 --batch 16
    ./run bench-models [args]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_info
from bench_overhead import _fmt, _quartiles
from lightning_gns.sources.per_example_norms import PerExampleGradNorms

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("plain", "engine", "torch_func")
MODELS = ("gpt2", "bert", "llama", "vit", "litgpt_llama", "litgpt_pythia")
LIBRARY = {
    "gpt2": "transformers",
    "bert": "transformers",
    "llama": "transformers",
    "vit": "transformers",
    "litgpt_llama": "litgpt",
    "litgpt_pythia": "litgpt",
}

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class Sizes:
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    seq: int = 128
    batch: int = 8
    vocab: int = 2048

    @property
    def image(self) -> tuple[int, int]:
        """ViT's image side and patch: at least ``seq`` patches."""
        patch = 8
        side = patch
        while (side // patch) ** 2 < self.seq:
            side += patch
        return side, patch


QUICK = Sizes(hidden=32, layers=2, heads=2, seq=16, batch=4, vocab=64)


# ------------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    """A library model: how to build it, its batch, the user's loss, and the examples' loss contributions."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Batch
    user_loss: Callable[[nn.Module, Batch], Tensor]
    logits: Callable[[nn.Module, Batch], Tensor]
    contributions: Callable[[Tensor, Batch, int], Tensor]
    dropout: bool


def _lm_contributions(logits: Tensor, batch: Batch, n_total: int) -> Tensor:
    """Example i's next-token losses over the batch's token count: they add up to the batch's mean loss."""
    ids = batch["input_ids"]
    n, t = ids.shape
    losses = F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return losses.view(n, t - 1).sum(1) / (n_total * (t - 1))


def _classification_contributions(logits: Tensor, batch: Batch, n_total: int) -> Tensor:
    return F.cross_entropy(logits, batch["labels"], reduction="none") / n_total


def _hf_lm(name: str, s: Sizes, build: Callable[[], nn.Module], description: str, dropout: bool) -> Model:
    ids = torch.randint(0, s.vocab, (s.batch, s.seq))
    return Model(
        name,
        description,
        build,
        {"input_ids": ids},
        user_loss=lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
        logits=lambda m, b: m(input_ids=b["input_ids"]).logits,
        contributions=_lm_contributions,
        dropout=dropout,
    )


def _litgpt(name: str, s: Sizes, description: str, **kwargs: Any) -> Model:
    import litgpt

    def build() -> nn.Module:
        config = litgpt.Config(
            n_layer=s.layers,
            n_embd=s.hidden,
            n_head=s.heads,
            block_size=s.seq,
            vocab_size=s.vocab,
            padded_vocab_size=s.vocab,
            **kwargs,
        )
        return litgpt.GPT(config)

    def user_loss(m: nn.Module, b: Batch) -> Tensor:
        ids = b["input_ids"]
        logits = m(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return Model(
        name,
        description,
        build,
        {"input_ids": torch.randint(0, s.vocab, (s.batch, s.seq))},
        user_loss=user_loss,
        logits=lambda m, b: m(b["input_ids"]),
        contributions=_lm_contributions,
        dropout=False,
    )


def make_model(name: str, s: Sizes) -> Model:
    """The model ``name`` at sizes ``s``, with its seeded synthetic batch (library defaults otherwise)."""
    torch.manual_seed(0)
    inner = 4 * s.hidden
    if name.startswith("litgpt"):
        if name == "litgpt_llama":
            return _litgpt(
                name,
                s,
                "litgpt llama-like (RMSNorm, LLaMAMLP, GQA 2 kv groups, full rotary)",
                n_query_groups=max(1, s.heads // 2),
                norm_class_name="RMSNorm",
                mlp_class_name="LLaMAMLP",
                intermediate_size=inner,
                bias=False,
                parallel_residual=False,
                rotary_percentage=1.0,
            )
        return _litgpt(
            name,
            s,
            "litgpt pythia-like (LayerNorm, GptNeoxMLP, parallel residual, rotary 25%)",
            norm_class_name="LayerNorm",
            mlp_class_name="GptNeoxMLP",
            intermediate_size=inner,
            bias=True,
            parallel_residual=True,
            rotary_percentage=0.25,
        )
    import transformers as tf

    if name == "gpt2":
        config = tf.GPT2Config(n_layer=s.layers, n_embd=s.hidden, n_head=s.heads, n_positions=s.seq, vocab_size=s.vocab)
        return _hf_lm(name, s, lambda: tf.GPT2LMHeadModel(config), "GPT2LMHeadModel (dropout 0.1, tied lm_head)", True)
    if name == "llama":
        config = tf.LlamaConfig(
            vocab_size=s.vocab,
            hidden_size=s.hidden,
            intermediate_size=inner,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=max(1, s.heads // 2),
            max_position_embeddings=s.seq,
        )
        return _hf_lm(name, s, lambda: tf.LlamaForCausalLM(config), "LlamaForCausalLM (GQA, RMSNorm)", False)
    labels = torch.randint(0, 10, (s.batch,))
    if name == "bert":
        config = tf.BertConfig(
            vocab_size=s.vocab,
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=inner,
            max_position_embeddings=s.seq,
            num_labels=10,
        )
        return Model(
            name,
            "BertForSequenceClassification, 10 labels (dropout 0.1)",
            lambda: tf.BertForSequenceClassification(config),
            {"input_ids": torch.randint(0, s.vocab, (s.batch, s.seq)), "labels": labels},
            user_loss=lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss,
            logits=lambda m, b: m(input_ids=b["input_ids"]).logits,
            contributions=_classification_contributions,
            dropout=True,
        )
    if name == "vit":
        side, patch = s.image
        config = tf.ViTConfig(
            image_size=side,
            patch_size=patch,
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=inner,
            num_labels=10,
        )
        return Model(
            name,
            f"ViTForImageClassification, {side}x{side} images, patch {patch}, 10 labels",
            lambda: tf.ViTForImageClassification(config),
            {"pixel_values": torch.randn(s.batch, 3, side, side), "labels": labels},
            user_loss=lambda m, b: m(pixel_values=b["pixel_values"], labels=b["labels"]).loss,
            logits=lambda m, b: m(pixel_values=b["pixel_values"]).logits,
            contributions=_classification_contributions,
            dropout=False,
        )
    raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")


# ------------------------------------------------------------------------------------------------------- methods

StepFn = Callable[[], Tensor | None]


class _Logits(nn.Module):
    """The model's logits as a module, for ``functional_call``."""

    def __init__(self, spec: Model, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, batch: Batch) -> Tensor:
        return self.spec.logits(self.model, batch)


def _zero_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def plain_step(spec: Model, model: nn.Module) -> tuple[StepFn, Callable[[], None]]:
    def step() -> None:
        _zero_grad(model)
        spec.user_loss(model, spec.batch).backward()

    return step, lambda: None


def engine_step(spec: Model, model: nn.Module) -> tuple[StepFn, Callable[[], None]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback warnings are reported by the tests, not here
        engine = PerExampleGradNorms(model, strict=False).attach()

    def step() -> Tensor:
        _zero_grad(model)
        spec.user_loss(model, spec.batch).backward()
        records = engine.pop()
        if len(records) != 1:
            raise RuntimeError(f"Expected one record per backward pass, got {len(records)}.")
        return records[0].sq_norms

    return step, engine.remove


def torch_func_step(spec: Model, model: nn.Module) -> tuple[StepFn, Callable[[], None]]:
    wrapper = _Logits(spec, model)
    params = {n: p for n, p in wrapper.named_parameters() if p.requires_grad}
    buffers = dict(wrapper.named_buffers())
    n = next(iter(spec.batch.values())).shape[0]

    def contribution(p: dict[str, Tensor], example: Batch) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}
        return spec.contributions(functional_call(wrapper, (p, buffers), (one,)), one, n)[0]

    randomness = "different" if spec.dropout and model.training else "error"
    per_example = vmap(grad(contribution), in_dims=(None, 0), randomness=randomness)

    def step() -> Tensor:
        grads = per_example({k: p.detach() for k, p in params.items()}, spec.batch)
        for k, p in params.items():
            p.grad = grads[k].sum(0)
        return torch.stack([g.square().flatten(1).sum(1) for g in grads.values()]).sum(0)

    return step, lambda: None


FACTORIES = {"plain": plain_step, "engine": engine_step, "torch_func": torch_func_step}


# ------------------------------------------------------------------------------------------------------- protocol


@dataclass
class Row:
    model: str
    method: str
    status: str = "ok"  # ok | error | skipped
    detail: str = ""
    step_ms: float = float("nan")
    step_ms_iqr: tuple[float, float] = (float("nan"), float("nan"))
    ratio: float = float("nan")
    ratio_iqr: tuple[float, float] = (float("nan"), float("nan"))
    norm_rel_err: float = float("nan")  # engine against torch_func, at the initial weights, dropout off
    times_ms: list[float] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def check_norms(spec: Model, base: nn.Module) -> float:
    """Max relative difference of the engine's norms to torch.func's, with dropout off (both float32)."""
    norms = []
    for factory in (engine_step, torch_func_step):
        model = copy.deepcopy(base).eval()
        step, close = factory(spec, model)
        try:
            norms.append(step())
        finally:
            close()
    engine, exact = (v.double() for v in norms)
    return float(((engine - exact).abs() / exact).max())


def run_model(spec: Model, *, repeats: int, inner: int, warmup: int) -> list[Row]:
    base = spec.build().float().train()
    rows = {m: Row(spec.name, m) for m in METHODS}
    try:
        rows["engine"].norm_rel_err = check_norms(spec, base)
    except Exception as exc:  # any failure is a finding to report, not a crash
        rows["engine"].status, rows["engine"].detail = "error", _first_line(exc)
    runners: dict[str, tuple[StepFn, Callable[[], None]]] = {}
    for method in METHODS:
        if rows[method].status != "ok":
            continue
        try:
            runner = FACTORIES[method](spec, copy.deepcopy(base))
            for _ in range(warmup):
                runner[0]()
        except Exception as exc:
            rows[method].status, rows[method].detail = "error", _first_line(exc)
            continue
        runners[method] = runner
    order = list(runners)
    times: dict[str, list[float]] = {m: [] for m in order}
    for r in range(repeats):
        shift = r % max(1, len(order))
        for method in order[shift:] + order[:shift]:
            if method not in runners:
                continue
            step = runners[method][0]
            try:
                start = time.perf_counter()
                for _ in range(inner):
                    step()
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
        if "plain" in runners and times["plain"]:
            r1, r2, r3 = _quartiles([t / b for t, b in zip(times[method], times["plain"], strict=True)])
            row.ratio, row.ratio_iqr = r2, (r1, r3)
    return [rows[m] for m in METHODS]


# ------------------------------------------------------------------------------------------------------- report


def to_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# Library models: per-example gradient norms against a plain step",
        "",
        f"- Run: {meta['date']}, `{meta['command']}`",
        f"- Device: {meta['device']}; torch threads: {meta['threads']}; 1-minute load average "
        f"{meta['load_average_at_start']:.2f} at the start, {meta['load_average_at_end']:.2f} at the end",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Sizes: {meta['sizes']}; float32, train mode (library default dropout)",
        f"- Protocol: {meta['warmup']} warm-up steps per method, then {meta['repeats']} interleaved rounds of "
        f"{meta['inner']} steps each (zero_grad + forward + backward, no optimizer step). Times and ratios are the "
        "median [interquartile range] over rounds; a ratio is taken within each round.",
        "- 'norm rel err': the engine's [N] squared norms against torch.func's at the initial weights, dropout off, "
        "both float32 (max over examples).",
        "",
        "Models:",
        "",
    ]
    lines += [f"- `{name}`: {desc}" for name, desc in meta["models"].items()]
    lines += [
        "",
        "| model | method | ms / step | × plain | norm rel err | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r.status if r.status == "ok" else f"{r.status}: {r.detail}".replace("|", "\\|")
        lines.append(
            f"| {r.model} | {r.method} "
            f"| {_fmt(r.step_ms, '.1f')} [{_fmt(r.step_ms_iqr[0], '.1f')}, {_fmt(r.step_ms_iqr[1], '.1f')}] "
            f"| {_fmt(r.ratio, '.2f')} [{_fmt(r.ratio_iqr[0], '.2f')}, {_fmt(r.ratio_iqr[1], '.2f')}] "
            f"| {_fmt(r.norm_rel_err, '.1e')} | {status} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {MODELS}")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK}), 3 rounds: a smoke test")
    d = Sizes()
    parser.add_argument("--hidden", type=int, default=None, help=f"width (default {d.hidden})")
    parser.add_argument("--layers", type=int, default=None, help=f"blocks (default {d.layers})")
    parser.add_argument("--heads", type=int, default=None, help=f"attention heads (default {d.heads})")
    parser.add_argument("--seq", type=int, default=None, help=f"tokens / patches per example (default {d.seq})")
    parser.add_argument("--batch", type=int, default=None, help=f"examples per step (default {d.batch})")
    parser.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default {d.vocab})")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7; quick 3)")
    parser.add_argument("--inner", type=int, default=None, help="steps per method per round (default 2; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for models_overhead.{md,json}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark from the command line; see ``--help``."""
    args = _parse_args(argv)
    base = QUICK if args.quick else Sizes()
    sizes = Sizes(
        **{
            k: getattr(args, k) if getattr(args, k) is not None else getattr(base, k)
            for k in ("hidden", "layers", "heads", "seq", "batch", "vocab")
        }
    )
    repeats = args.repeats or (3 if args.quick else 7)
    inner = args.inner or (1 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.set_flush_denormal(True)
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"Unknown models {unknown}; expected some of {list(MODELS)}.")
    out = args.out or (Path(tempfile.gettempdir()) / "lightning-gns-models-quick" if args.quick else RESULTS_DIR)

    load_at_start = run_info.load_average()
    rows: list[Row] = []
    descriptions: dict[str, str] = {}
    for name in names:
        if importlib.util.find_spec(LIBRARY[name]) is None:
            extra = "models-litgpt" if LIBRARY[name] == "litgpt" else "models"
            descriptions[name] = f"skipped: {LIBRARY[name]} is not installed (extra `{extra}`)"
            rows += [Row(name, m, status="skipped", detail=descriptions[name]) for m in METHODS]
            continue
        spec = make_model(name, sizes)
        n_params = sum(p.numel() for p in spec.build().parameters())
        descriptions[name] = f"{spec.description}, {n_params:,} parameters"
        start = time.perf_counter()
        rows += run_model(spec, repeats=repeats, inner=inner, warmup=warmup)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": f"CPU ({run_info.cpu_name()}, {os.cpu_count()} cores)",
        "load_average_at_start": load_at_start,
        "load_average_at_end": run_info.load_average(),
        "threads": torch.get_num_threads(),
        "versions": run_info.versions(("torch", "transformers", "litgpt", "lightning-gns"), with_commit=True),
        "sizes": asdict(sizes),
        "repeats": repeats,
        "inner": inner,
        "warmup": warmup,
        "models": descriptions,
    }
    report = to_markdown(rows, meta)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "models_overhead.md").write_text(report)
    (out / "models_overhead.json").write_text(
        json.dumps(run_info.json_safe({"meta": meta, "results": [asdict(r) for r in rows]}), indent=2) + "\n"
    )
    return rows


if __name__ == "__main__":
    main()
