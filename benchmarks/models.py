"""Benchmark tasks: a model, a loss and one fixed synthetic batch, sized so that a CPU step takes ~5–50 ms.

The networks are those of the demo (:mod:`lightning_gns.demo.nets`), so that the numbers speak for the models that
users of the demo train. The data are synthetic (seeded Gaussian inputs, uniform labels or tokens): timing and the
exactness of per-example norms do not depend on what the data mean, and nothing needs downloading.

=====================  ======================================================================================
task                   what it exercises
=====================  ======================================================================================
``mlp``                Linear + GELU, 256 → 512 → 512 → 10, batch 256: per-example weight gradients are big
``cnn``                Conv2d + GroupNorm on 3×32×32 images, batch 64: GroupNorm is beyond some peers
``transformer``        TinyGPT with ``nn.Linear`` attention, T=64, d=128, batch 32: Embedding, LayerNorm,
                       sequence Linear layers (3-D inputs), a position embedding
``transformer_mha``    the same with ``nn.MultiheadAttention``, which peers trip over
=====================  ======================================================================================

Every loss is a mean: over the batch, and for the language models over every token, so that one example is one
sequence and its loss the mean of its token losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns.demo.nets import MLP, SmallCNN, TinyGPT

LossFn = Callable[[Tensor, Tensor], Tensor]

TASKS = ("mlp", "cnn", "transformer", "transformer_mha")


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over every position: ``[N, C]`` or ``[N, T, C]`` logits, ``[N]`` or ``[N, T]`` targets."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


@dataclass
class BenchTask:
    """One benchmark case.

    Attributes:
        name: the task's name in :data:`TASKS`.
        build: makes a freshly initialised model (seed the global RNG first for identical copies).
        inputs: the batch's inputs.
        targets: the batch's targets.
        loss_fn: ``(output, target) -> scalar`` mean loss.
        description: one line for the report.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Tensor
    targets: Tensor
    loss_fn: LossFn
    description: str

    @property
    def batch_size(self) -> int:
        """Number of examples in the batch."""
        return self.inputs.shape[0]


def make_task(name: str, device: torch.device | str = "cpu", seed: int = 0, scale: float = 1.0) -> BenchTask:
    """Build the task ``name`` with its batch on ``device``.

    Args:
        name: one of :data:`TASKS`.
        device: where the batch lives (models are moved there by the harness).
        seed: seed of the synthetic batch.
        scale: multiplies the batch size (at least 2 examples remain), e.g. to fill a GPU.

    Returns:
        The task.

    Raises:
        ValueError: if ``name`` is not a known task.
    """
    gen = torch.Generator().manual_seed(seed)

    def batch(n: int) -> int:
        return max(2, round(n * scale))

    if name == "mlp":
        n = batch(256)
        return BenchTask(
            name,
            lambda: MLP(256, 10, hidden=512, depth=2, activation="gelu"),
            torch.randn(n, 256, generator=gen).to(device),
            torch.randint(0, 10, (n,), generator=gen).to(device),
            cross_entropy,
            f"MLP 256-512-512-10 (GELU), batch {n}",
        )
    if name == "cnn":
        n = batch(64)
        return BenchTask(
            name,
            lambda: SmallCNN(3, 10, channels=(32, 64, 64), groups=8, activation="relu", pool_size=2),
            torch.randn(n, 3, 32, 32, generator=gen).to(device),
            torch.randint(0, 10, (n,), generator=gen).to(device),
            cross_entropy,
            f"CNN 3x32x32, conv 32-64-64 + GroupNorm(8), batch {n}",
        )
    if name in ("transformer", "transformer_mha"):
        n, t, vocab = batch(32), 64, 96
        attention: Literal["linear", "mha"] = "mha" if name == "transformer_mha" else "linear"
        tokens = torch.randint(0, vocab, (n, t + 1), generator=gen).to(device)
        return BenchTask(
            name,
            lambda: TinyGPT(vocab, block_size=t, d_model=128, n_layer=2, n_head=4, attention=attention),
            tokens[:, :-1],
            tokens[:, 1:],
            cross_entropy,
            f"TinyGPT ({attention} attention) vocab {vocab}, T={t}, d=128, 2 layers, batch {n}",
        )
    raise ValueError(f"Expected a task in {TASKS}, but got {name!r}.")
