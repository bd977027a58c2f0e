"""What the batch-size growth tests share: an indexed data set, a recording model, a scripted scheduler."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_gns import BatchSizeScheduler
from lightning_gns.scheduler import BatchSizeChange


class IndexedDataset(Dataset):
    """Regression data whose items carry their own index, so that every served example can be counted."""

    def __init__(self, size: int = 90, features: int = 6, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, features, generator=generator)
        weights = torch.randn(features, 1, generator=generator)
        self.y = self.x @ weights + 0.3 * torch.randn(size, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.x[index], self.y[index], index


class Recorder(pl.LightningModule):
    """Records, per batch, the epoch, the indices served, the loss and the learning rate inside each step."""

    def __init__(
        self, features: int = 6, lr: float = 0.05, optimizer: str = "sgd", lr_schedule: str | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr = lr
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.served: list[tuple[int, int, list[int]]] = []
        self.losses: list[float] = []
        self.step_lrs: list[tuple[float, float]] = []  # (lr inside the optimizer step, the scheduler's lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        self.served.append((self.current_epoch, batch_idx, index.tolist()))
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.lr_schedule is None:
            return optimizer
        if self.lr_schedule == "step":
            scheduler: Any = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # Registered after the monitor's hooks (callbacks' on_train_start runs first): sees the scaled rate.
        for optimizer in self.trainer.optimizers:
            optimizer.register_step_pre_hook(self._record_lr)

    def _record_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scheduler_lr = self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] if self.lr_schedule else None
        self.step_lrs.append((optimizer.param_groups[0]["lr"], scheduler_lr if scheduler_lr is not None else self.lr))


class ScriptedScheduler(BatchSizeScheduler):
    """Grows on a fixed script of (examples seen, new batch size), whatever the noise scale: the wiring under test.

    The policy itself is tested on its own; this makes the growth points certain.
    """

    def __init__(self, initial_batch_size: int, script: list[tuple[float, int]]) -> None:
        super().__init__(initial_batch_size)
        self.script = script

    def update(
        self, b_simple: float, b_simple_lower: float, b_simple_upper: float, examples_seen: float
    ) -> BatchSizeChange | None:
        if self.num_changes >= len(self.script):
            return None
        threshold, size = self.script[self.num_changes]
        if examples_seen < threshold:
            return None
        return self._change(size, float(size), examples_seen, f"scripted at {threshold} examples")
