"""Pure-torch core of lightning-gns: estimators, smoothing and uncertainty. No Lightning, no state."""

from lightning_gns.functional.noise_scale import (
    NoiseScaleSums,
    b_simple,
    gns_estimates,
    gradient_noise_scale,
    relative_examples,
    relative_steps,
    suggested_batch_size,
)
from lightning_gns.functional.smoothing import NoiseScaleEMA, ema_compute, ema_init, ema_update
from lightning_gns.functional.uncertainty import ratio_interval, ratio_std

__all__ = [
    "NoiseScaleEMA",
    "NoiseScaleSums",
    "b_simple",
    "ema_compute",
    "ema_init",
    "ema_update",
    "gns_estimates",
    "gradient_noise_scale",
    "ratio_interval",
    "ratio_std",
    "relative_examples",
    "relative_steps",
    "suggested_batch_size",
]
