"""lightning-gns: the gradient noise scale of a PyTorch Lightning run, measured while it trains."""

from lightning_gns.callbacks.batch_size_growth import BatchSizeGrowth
from lightning_gns.callbacks.noise_scale_monitor import NoiseScaleMonitor
from lightning_gns.metric import GradientNoiseScale
from lightning_gns.sampler import ResizableBatchSampler
from lightning_gns.scheduler import BatchSizeScheduler

__version__ = "0.1.0"

__all__ = [
    "BatchSizeGrowth",
    "BatchSizeScheduler",
    "GradientNoiseScale",
    "NoiseScaleMonitor",
    "ResizableBatchSampler",
    "__version__",
]
