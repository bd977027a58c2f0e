"""Lightning callbacks."""

from lightning_gns.callbacks.batch_size_growth import BatchSizeGrowth
from lightning_gns.callbacks.noise_scale_monitor import NoiseScaleMonitor

__all__ = ["BatchSizeGrowth", "NoiseScaleMonitor"]
