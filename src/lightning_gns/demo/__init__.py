"""Small, deterministic training tasks on data that ships with the installed packages (nothing is downloaded).

========================  ==============================  ======================================
Task                      Data module                     Lightning modules
========================  ==============================  ======================================
digit classification      :class:`DigitsDataModule`       :class:`DigitsMLP`, :class:`DigitsCNN`
character language model  :class:`CharTextDataModule`     :class:`CharTransformer`
========================  ==============================  ======================================

Call ``lightning.seed_everything(seed)`` before building a module to make a run repeatable; each task trains a
few hundred steps in well under a minute on two CPU cores. This package imports ``lightning`` and, for the digits,
``scikit-learn`` (the ``demo`` extra).
"""

from lightning_gns.demo.data import CharTextDataModule, DigitsDataModule, load_text_corpus
from lightning_gns.demo.models import CharTransformer, DigitsCNN, DigitsMLP
from lightning_gns.demo.nets import MLP, SmallCNN, TinyGPT

__all__ = [
    "MLP",
    "CharTextDataModule",
    "CharTransformer",
    "DigitsCNN",
    "DigitsDataModule",
    "DigitsMLP",
    "SmallCNN",
    "TinyGPT",
    "load_text_corpus",
]
