"""Lightning callbacks."""

from lightning_gns.callbacks.noise_scale_monitor import NoiseScaleMonitor

__all__ = ["NoiseScaleMonitor"]
