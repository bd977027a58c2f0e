"""Data modules of the demo tasks, built from data that ships with the installed packages (nothing is downloaded).

- :class:`DigitsDataModule`: scikit-learn's ``load_digits`` (1797 grey 8×8 images, 10 classes).
- :class:`CharTextDataModule`: next-character prediction on text that ships with Python
  (:func:`load_text_corpus`).

Both split train and validation with a fixed seed, read ``batch_size`` each time a training loader is built (so
that Lightning's ``lightning_setattr`` and batch-size growth can change it) and shuffle the training set with a
generator of their own, so that the order of the examples does not depend on how many random numbers the model's
initialisation drew.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["CharTextDataModule", "DigitsDataModule", "load_text_corpus"]

# Standard-library modules whose docstrings stand in for `pydoc_data.topics` on a Python built without it.
_FALLBACK_MODULES = (
    "argparse", "collections", "contextlib", "dataclasses", "functools", "inspect", "itertools", "json",
    "logging", "pathlib", "re", "string", "textwrap", "typing", "unittest",
)  # fmt: skip


def load_text_corpus() -> str:
    """Return a few hundred kilobytes of English text that ships with Python.

    The text of the interactive help topics (``pydoc_data.topics``, about 465 000 characters on CPython 3.11),
    concatenated in sorted key order. Where a Python build lacks that module, the docstrings of a fixed list of
    standard-library modules (and of their public members) stand in.

    Returns:
        The corpus, identical from one call to the next on the same Python.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return _stdlib_docstrings()
    return "".join(topics[key] for key in sorted(topics))


def _stdlib_docstrings() -> str:
    parts: list[str] = []
    # Reading deprecated members (``typing.io``) warns; the text is all we want from them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _FALLBACK_MODULES:
            module = importlib.import_module(name)
            parts.append(inspect.getdoc(module) or "")
            for member_name in sorted(vars(module)):
                if not member_name.startswith("_"):
                    parts.append(inspect.getdoc(getattr(module, member_name)) or "")
    return "\n\n".join(p for p in parts if p)


def _split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a seeded random train/validation split of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction)))  # neither split may be empty
    return perm[n_val:], perm[:n_val]


class _SplitDataModule(LightningDataModule):
    """Loaders over a ``train_set``/``val_set`` pair that subclasses build in ``setup``."""

    train_set: TensorDataset
    val_set: TensorDataset

    def __init__(self, batch_size: int, val_fraction: float, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` in (0, 1), but got {val_fraction}.")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, but got {num_workers}.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self._shuffle_generator = torch.Generator().manual_seed(seed)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=self._shuffle_generator if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches of ``batch_size``; the last one may be smaller, so each example appears once."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's bundled handwritten digits as ``(features, label)`` batches.

    Each example is a ``float32`` vector of the 64 pixels of an 8×8 image, standardised with the mean and standard
    deviation of the training split (pixels that are constant there are only centred); a label is an ``int64`` in
    ``[0, 10)``. Convolutional models reshape the vector to ``[1, 8, 8]``.

    Args:
        batch_size: examples per training and validation batch.
        val_fraction: share of the 1797 images held out for validation.
        num_workers: worker processes of each loader (0 loads in the main process).
        seed: seed of the train/validation split and of the shuffling.

    Raises:
        ValueError: if ``batch_size`` < 1, ``num_workers`` < 0 or ``val_fraction`` is not in (0, 1).
    """

    num_features = 64
    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        """Load the images, split them and standardise the features."""
        if hasattr(self, "train_set"):
            return
        from sklearn.datasets import load_digits

        digits: Any = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32)
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        train_idx, val_idx = _split(len(y), self.val_fraction, self.seed)
        mean = x[train_idx].mean(0)
        std = x[train_idx].std(0)
        x = (x - mean) / torch.where(std > 1e-6, std, torch.ones_like(std))
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])


class CharTextDataModule(_SplitDataModule):
    """Next-character prediction on :func:`load_text_corpus`, as ``(input, target)`` batches of token ids.

    The text is encoded with a character vocabulary (its sorted distinct characters) and cut into non-overlapping
    chunks of ``block_size + 1`` characters; a chunk gives ``input = chunk[:-1]`` and ``target = chunk[1:]``, both
    ``int64`` of shape ``[block_size]``. One example is one sequence: the tokens of a chunk are correlated, so a
    per-example gradient is that of the sequence's mean token loss.

    Args:
        block_size: tokens per example.
        batch_size: sequences per training and validation batch.
        val_fraction: share of the chunks held out for validation.
        num_workers: worker processes of each loader (0 loads in the main process).
        seed: seed of the train/validation split and of the shuffling.
        max_chars: use only the first ``max_chars`` characters of the corpus (``None``: all of it).

    Raises:
        ValueError: if an argument is out of range, or the text is too short for one chunk per split.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        max_chars: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        if block_size < 1:
            raise ValueError(f"Expected `block_size` >= 1, but got {block_size}.")
        self.block_size = block_size
        self.save_hyperparameters()
        text = load_text_corpus()
        if max_chars is not None:
            text = text[:max_chars]
        if len(text) < 2 * (block_size + 1):
            raise ValueError(
                f"Expected at least {2 * (block_size + 1)} characters (two chunks of `block_size` + 1), "
                f"but the text has {len(text)}."
            )
        # The vocabulary comes from the whole text so that validation never meets an unknown character.
        self.chars: list[str] = sorted(set(text))
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        self._text = text

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters (the model's input and output size)."""
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Token ids (``int64``, shape ``[len(text)]``) of ``text``; every character must be in the vocabulary."""
        return torch.tensor([self._stoi[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D tensor of token ids."""
        return "".join(self.chars[i] for i in ids.tolist())

    def setup(self, stage: str | None = None) -> None:
        """Encode the text, cut it into chunks and split them."""
        if hasattr(self, "train_set"):
            return
        ids = self.encode(self._text)
        chunk = self.block_size + 1
        chunks = ids[: len(ids) // chunk * chunk].view(-1, chunk)
        train_idx, val_idx = _split(len(chunks), self.val_fraction, self.seed)
        self.train_set = TensorDataset(chunks[train_idx, :-1], chunks[train_idx, 1:])
        self.val_set = TensorDataset(chunks[val_idx, :-1], chunks[val_idx, 1:])
