"""Lightning modules of the demo tasks: the networks of :mod:`lightning_gns.demo.nets` with a loss and an optimizer.

Every module logs ``train/loss`` each training step and ``val/loss``, ``val/acc`` each validation epoch. The loss is
a cross-entropy averaged over the batch (``reduction="mean"``): a backward pass hands each example ``g_i / N``.

=================  ========================================================================
Logged key         Meaning
=================  ========================================================================
``train/loss``     mean cross-entropy of the training batch (per step)
``val/loss``       mean cross-entropy over the validation set (per epoch)
``val/acc``        share of correct predictions (of tokens, for the language model)
=================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from typing_extensions import override

from lightning_gns.demo.nets import MLP, Activation, AttentionKind, SmallCNN, TinyGPT

__all__ = ["CharTransformer", "DigitsCNN", "DigitsMLP"]

OptimizerName = Literal["sgd", "adam"]


class _DemoModule(LightningModule):
    """Shared training logic: cross-entropy on ``(input, target)`` batches and an SGD or Adam optimizer."""

    net: torch.nn.Module

    def __init__(self, optimizer: OptimizerName, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"Expected `optimizer` to be 'sgd' or 'adam', but got {optimizer!r}.")
        if lr < 0:
            raise ValueError(f"Expected `lr` >= 0, but got {lr}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Expected `momentum` in [0, 1), but got {momentum}.")
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def _logits(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss_and_logits(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self._logits(x)
        # Flattening the time axis of a sequence model averages over all N·T tokens; with sequences of equal
        # length that is the mean over examples of each sequence's mean token loss.
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, logits, y

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of inputs."""
        return self._logits(x)

    @override
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss, _, y = self._loss_and_logits(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    @override
    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        loss, logits, y = self._loss_and_logits(batch)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("val/acc", acc, batch_size=y.shape[0])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DigitsMLP(_DemoModule):
    """An MLP classifier of the 64 standardised pixels of :class:`~lightning_gns.demo.data.DigitsDataModule`.

    Args:
        hidden: width of each hidden layer (64 → hidden → … → 10).
        depth: number of hidden layers.
        activation: ``"gelu"`` or ``"relu"``.
        layer_norm: put a ``LayerNorm`` before each hidden activation.
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (unused by Adam).
        weight_decay: L2 penalty of the optimizer.
    """

    def __init__(
        self,
        hidden: int = 128,
        depth: int = 2,
        activation: Activation = "gelu",
        layer_norm: bool = False,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = MLP(64, 10, hidden=hidden, depth=depth, activation=activation, layer_norm=layer_norm)


class DigitsCNN(_DemoModule):
    """A small convolutional classifier (Conv2d + GroupNorm) of the 8×8 digits.

    It takes the 64-pixel vectors of :class:`~lightning_gns.demo.data.DigitsDataModule` and reshapes them to
    ``[N, 1, 8, 8]``. GroupNorm rather than BatchNorm keeps the examples of a batch independent, which per-example
    gradients need.

    Args:
        channels: output channels of each convolution stage (the first keeps 8×8, each later one halves it).
        groups: GroupNorm groups; must divide every entry of ``channels``.
        activation: ``"gelu"`` or ``"relu"``.
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (unused by Adam).
        weight_decay: L2 penalty of the optimizer.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        groups: int = 4,
        activation: Activation = "gelu",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = SmallCNN(1, 10, channels=tuple(channels), groups=groups, activation=activation, pool_size=4)

    @override
    def _logits(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(-1, 1, 8, 8))


class CharTransformer(_DemoModule):
    """A tiny decoder-only transformer trained on :class:`~lightning_gns.demo.data.CharTextDataModule`.

    The loss is the cross-entropy averaged over every token of the batch. An example is a whole sequence, not a
    token: its per-example gradient is that of the sequence's mean token loss.

    Args:
        vocab_size: number of distinct characters (``CharTextDataModule.vocab_size``).
        block_size: tokens per sequence.
        d_model: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads; must divide ``d_model``.
        mlp_ratio: hidden width of each block's MLP relative to ``d_model``.
        attention: ``"linear"`` (q/k/v and output projections as ``nn.Linear``, which per-example norm rules
            cover) or ``"mha"`` (``nn.MultiheadAttention``).
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (unused by Adam).
        weight_decay: L2 penalty of the optimizer.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        mlp_ratio: int = 4,
        attention: AttentionKind = "linear",
        optimizer: OptimizerName = "adam",
        lr: float = 3e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = TinyGPT(
            vocab_size,
            block_size=block_size,
            d_model=d_model,
            n_layer=n_layer,
            n_head=n_head,
            mlp_ratio=mlp_ratio,
            attention=attention,
        )
