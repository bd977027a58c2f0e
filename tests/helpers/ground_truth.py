"""A small Lightning classifier on a fixed finite data set, and its exact per-example gradients (torch.func)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset


def make_dataset(num_examples: int = 256, features: int = 12, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian clusters with label noise: a gradient that does not vanish and a noise that does not either."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=gen) * 1.5
    labels = torch.randint(classes, (num_examples,), generator=gen)
    inputs = centers[labels] + torch.randn(num_examples, features, generator=gen)
    flip = torch.rand(num_examples, generator=gen) < 0.2
    labels = torch.where(flip, torch.randint(classes, (num_examples,), generator=gen), labels)
    return TensorDataset(inputs, labels)


def make_net(features: int = 12, classes: int = 4, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, classes))


class Classifier(pl.LightningModule):
    """Cross-entropy (mean over the batch) with SGD at a given learning rate (0 keeps the weights fixed)."""

    def __init__(self, net: nn.Module, lr: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def pretrain(
    net: nn.Module,
    dataset: TensorDataset,
    steps: int = 150,
    lr: float = 0.3,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int = 32,
    seed: int = 1,
) -> torch.optim.Optimizer:
    """A little plain training (SGD unless ``optimizer`` is given) so that B_simple is far from 1; the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    done = 0
    while done < steps:
        for inputs, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(inputs), labels).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return optimizer
    return optimizer


def per_example_flat_grads(
    net: nn.Module, dataset: TensorDataset, sq_weights: dict[str, Tensor] | None = None
) -> Tensor:
    """Every example's gradient (torch.func), flattened to ``[N, D]`` in float64; times P with ``sq_weights`` = P²."""
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(net, p, (x[None],)), y[None])

    inputs, labels = dataset.tensors[:2]
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    if sq_weights is not None:
        per_example = {k: g.double() * sq_weights[k].double().sqrt() for k, g in per_example.items()}
    return torch.cat([g.reshape(inputs.shape[0], -1) for g in per_example.values()], dim=1).double()


def exact_truth(
    net: nn.Module, dataset: TensorDataset, sq_weights: dict[str, Tensor] | None = None
) -> dict[str, float]:
    """|G|², tr(S²) and the finite-population expectations of the two estimators, from every g_i.

    With ``sq_weights`` (P² by parameter name, a diagonal preconditioner) the same for the preconditioned
    per-example gradients P ⊙ g_i.
    """
    flat = per_example_flat_grads(net, dataset, sq_weights)
    n = flat.shape[0]
    mean = flat.mean(0)
    trace_s2 = float(((flat - mean) ** 2).sum() / (n - 1))
    grad_sq_norm = float(mean.pow(2).sum())
    return {
        "grad_sq_norm": grad_sq_norm,
        "trace_s2": trace_s2,
        # Batches without replacement (DESIGN.md): E[trace] = tr(S²), E[|G|²] = |G|² - tr(S²)/N, and |G|² itself
        # once the estimator adds back tr/N (`population_size=N`, the monitor's default).
        "expected_trace_sigma": trace_s2,
        "expected_grad_sq_norm_uncorrected": grad_sq_norm - trace_s2 / n,
        "expected_grad_sq_norm": grad_sq_norm,
        "b_simple": trace_s2 / grad_sq_norm,
    }


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; ``kwargs`` override."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def copy_net(net: nn.Module) -> nn.Module:
    """A fresh :func:`make_net` holding ``net``'s weights."""
    clone = make_net()
    clone.load_state_dict(net.state_dict())
    return clone


class SaveMonitorResults(pl.Callback):
    """Each rank writes what its monitor computed (ddp_spawn gives the parent nothing back) to ``rank{r}.pt``."""

    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_gns import NoiseScaleMonitor

        monitor = next(c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor))
        torch.save(
            {
                "run": monitor.metric.compute(),
                "smoothed": dict(monitor.estimates),
                "preconditioned": monitor.is_preconditioned,
                "source": monitor.source.name,
                "loss_reduction": monitor.source.loss_reduction,
            },
            self.directory / f"rank{trainer.global_rank}.pt",
        )
