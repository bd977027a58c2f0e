"""Precision of each gradient source: how far B_simple over a fixed number of steps strays from the truth.

The sources differ in the small batch they compare with the step's batch: 1 example (``per_example``), a
micro-batch (``accumulation``: B / accumulate_grad_batches) or a rank's share (``ddp``: B / world size; the same
estimator as accumulation with as many micro-batches). At fixed weights of the digits MLP (at initialisation and
after some SGD training), every per-example gradient of the training set is computed exactly with ``torch.func``;
that gives the truth (full-data |G|², tr(S²), B_simple) and lets each source's per-step norms be drawn exactly as
the source sees them: batches of B drawn without replacement, epoch after epoch, split into equal small batches.
Each source then runs ``--runs`` independent times for ``--steps`` steps, with the finite-population correction
the monitor applies; the spread of the resulting B_simple (ratio of the averaged estimates) is its precision.

Usage::

    python benchmarks/bench_precision.py               # well under a minute on 2 CPU cores; writes results/precision.md
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lightning_gns.demo import DigitsDataModule, DigitsMLP
from lightning_gns.functional import gns_estimates

RESULTS = Path(__file__).parent / "results"


def _per_example_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)


def _train(model: DigitsMLP, data: DigitsDataModule, steps: int) -> None:
    optimizer = model.configure_optimizers()
    loader = data.train_dataloader()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def _simulate(gram: torch.Tensor, batch: int, small: int, steps: int, runs: int, seed: int) -> torch.Tensor:
    """B_simple of `runs` independent runs of `steps` steps, each step split into batch // small small batches.

    Squared norms of mean gradients come from the Gram matrix K = g gᵀ of the per-example gradients:
    |mean over S|² = sum of K over S × S / |S|², exact and far cheaper than summing gradient vectors.
    """
    n = gram.shape[0]
    k = batch // small
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(runs, dtype=torch.float64)
    for run in range(runs):
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(steps * batch / n) + 1)])
        idx = order[: steps * batch].view(steps, batch)
        block = gram[idx[:, :, None], idx[:, None, :]]  # [steps, batch, batch]
        sq_big = block.sum((1, 2)) / batch**2
        diagonal = block.view(steps, k, small, k, small).diagonal(dim1=1, dim2=3)  # [steps, small, small, k]
        sq_small = diagonal.sum((1, 2)).mean(-1) / small**2
        g2, trace = gns_estimates(sq_small, sq_big, small, batch, population_size=n)
        out[run] = trace.mean() / g2.mean()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="steps averaged per run (the default EMA horizon)")
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--train-steps", default="0,200", help="SGD steps before the weights are fixed")
    parser.add_argument("--out", type=Path, default=RESULTS / "precision.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = []
    for train_steps in (int(s) for s in args.train_steps.split(",")):
        L.seed_everything(0, verbose=False)
        data = DigitsDataModule(batch_size=args.batch)
        data.setup("fit")
        model = DigitsMLP(layer_norm=True)
        _train(model, data, train_steps)
        x, y = data.train_set.tensors
        grads = _per_example_grads(model, x, y).double()
        n = grads.shape[0]
        gram = grads @ grads.T
        mean = grads.mean(0)
        true_g2 = mean.pow(2).sum().item()
        true_trace = (grads - mean).pow(2).sum().item() / (n - 1)
        truth = true_trace / true_g2
        del grads
        for small in (1, args.batch // 8, args.batch // 4, args.batch // 2):
            k = args.batch // small
            label = "per_example" if small == 1 else f"accumulation {k} / ddp {k} ranks"
            b = _simulate(gram, args.batch, small, args.steps, args.runs, seed=small)
            spread = (b.std() / truth).item()
            q05, q95 = torch.quantile(b, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
            rows.append((train_steps, truth, label, small, b.mean().item() / truth - 1, spread, q05, q95))
    elapsed = time.perf_counter() - start
    lines = [
        "# Precision of the gradient sources: B_simple over a fixed number of steps against the exact value",
        "",
        f"- Run: `python benchmarks/bench_precision.py` ({elapsed:.0f} s); digits MLP (64-128-128-10, LayerNorm, "
        f"GELU), N = {n} training examples, batch {args.batch}, {args.steps} steps per run, {args.runs} runs",
        "- Truth: every per-example gradient at the fixed weights (`torch.func`); B_simple = tr(S²)/|G|² of the "
        "full training set. Estimates are finite-population corrected, as the monitor does by default.",
        "- A source's small batch: 1 example (per_example), or B/k examples for k micro-batches (accumulation) or "
        "k ranks (ddp): the two give the same estimator.",
        "",
        "| weights | true B_simple | source (small batch) | B_small | mean bias | rel. spread (std) "
        "| 90% of runs within |",
        "|---|---|---|---|---|---|---|",
    ]
    for train_steps, truth, label, small, bias, spread, q05, q95 in rows:
        lines.append(
            f"| after {train_steps} SGD steps | {truth:.1f} | {label} | {small} | {bias:+.1%} | {spread:.1%} "
            f"| [{q05:.1f}, {q95:.1f}] |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
