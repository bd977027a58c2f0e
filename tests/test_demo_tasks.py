"""The demo tasks: data modules yield what they promise and every model learns."""

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from lightning_gns.demo import (
    CharTextDataModule,
    CharTransformer,
    DigitsCNN,
    DigitsDataModule,
    DigitsMLP,
    TinyGPT,
    load_text_corpus,
)
from lightning_gns.demo.data import _stdlib_docstrings

# A prefix of the corpus keeps the text tests fast; 40 000 characters are ~600 sequences of 64.
MAX_CHARS = 40_000


def _epoch_indices(loader):
    return sorted(i for batch in loader.batch_sampler for i in batch)


def test_digits_batches_shapes_and_dtypes():
    dm = DigitsDataModule(batch_size=50)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 64)
    assert x.dtype == torch.float32
    assert y.shape == (50,)
    assert y.dtype == torch.int64
    assert y.min() >= 0
    assert y.max() < 10
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == round(0.2 * 1797)
    # Standardised with the training split's statistics.
    x_train = dm.train_set.tensors[0]
    torch.testing.assert_close(x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    assert torch.all(x_train.std(0)[x_train.std(0) > 0] - 1 < 1e-4)


def test_char_batches_shapes_dtypes_and_shift():
    dm = CharTextDataModule(block_size=16, batch_size=8, max_chars=MAX_CHARS)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.min() >= 0
    assert x.max() < dm.vocab_size
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    # Non-overlapping chunks of block_size + 1 characters cover the text.
    assert len(dm.train_set) + len(dm.val_set) == MAX_CHARS // 17
    first = torch.cat([dm.train_set.tensors[0][:1], dm.train_set.tensors[1][:1, -1:]], dim=1)[0]
    assert dm.decode(first) in load_text_corpus()[:MAX_CHARS]


@pytest.mark.parametrize(
    "make", [lambda: DigitsDataModule(batch_size=64), lambda: CharTextDataModule(batch_size=7, max_chars=MAX_CHARS)]
)
def test_every_train_index_once_per_epoch(make):
    dm = make()
    dm.setup("fit")
    loader = dm.train_dataloader()
    n = len(dm.train_set)
    first, second = _epoch_indices(loader), _epoch_indices(loader)
    assert first == second == list(range(n))
    # The examples the loader yields are the training set, each once.
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape[0] == n
    key = lambda t: sorted(map(tuple, t.reshape(len(t), -1).tolist()))  # noqa: E731
    assert key(xs) == key(dm.train_set.tensors[0])


def test_split_and_order_are_seeded():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    torch.testing.assert_close(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])
    torch.testing.assert_close(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_batch_size_is_read_when_the_loader_is_built():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    dm.batch_size = 40
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 40
    assert dm.hparams["batch_size"] == 16  # hparams record the constructor's value


def test_char_vocab_round_trip():
    dm = CharTextDataModule(max_chars=MAX_CHARS)
    text = load_text_corpus()[:200]
    assert dm.decode(dm.encode(text)) == text
    assert dm.vocab_size == len(set(load_text_corpus()[:MAX_CHARS]))


def test_corpus_is_large_and_fallback_works():
    assert len(load_text_corpus()) > 200_000
    assert len(_stdlib_docstrings()) > 50_000


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DigitsDataModule(batch_size=0), "`batch_size` >= 1"),
        (lambda: DigitsDataModule(val_fraction=1.0), "`val_fraction` in"),
        (lambda: DigitsDataModule(num_workers=-1), "`num_workers` >= 0"),
        (lambda: CharTextDataModule(block_size=0, max_chars=100), "`block_size` >= 1"),
        (lambda: CharTextDataModule(block_size=64, max_chars=100), "at least 130 characters"),
        (lambda: DigitsMLP(optimizer="lamb"), "`optimizer` to be 'sgd' or 'adam'"),
        (lambda: DigitsMLP(depth=0), "`depth` >= 1"),
        (lambda: DigitsCNN(channels=(6, 8), groups=4), "`groups` to divide"),
        (lambda: TinyGPT(10, d_model=30, n_head=4), "`n_head` to divide `d_model`"),
        (lambda: TinyGPT(10, attention="flash"), "`attention` to be 'linear' or 'mha'"),
    ],
)
def test_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tinygpt_is_causal():
    torch.manual_seed(0)
    for attention in ("linear", "mha"):
        net = TinyGPT(20, block_size=12, d_model=16, n_head=2, attention=attention)
        idx = torch.randint(0, 20, (2, 12))
        changed = idx.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 20
        torch.testing.assert_close(net(idx)[:, :8], net(changed)[:, :8])


class _LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize(
    ("make_data", "make_model"),
    [
        (lambda: DigitsDataModule(batch_size=32), lambda dm: DigitsMLP()),
        (lambda: DigitsDataModule(batch_size=32), lambda dm: DigitsCNN()),
        (
            lambda: CharTextDataModule(batch_size=16, max_chars=MAX_CHARS),
            lambda dm: CharTransformer(dm.vocab_size, n_layer=1),
        ),
        (
            lambda: CharTextDataModule(block_size=32, batch_size=16, max_chars=MAX_CHARS),
            lambda dm: CharTransformer(dm.vocab_size, block_size=32, n_layer=1, attention="mha"),
        ),
    ],
    ids=["mlp", "cnn", "transformer", "transformer-mha"],
)
def test_training_loss_decreases(make_data, make_model):
    L.seed_everything(0)
    dm = make_data()
    model = make_model(dm)
    recorder = _LossRecorder()
    trainer = L.Trainer(
        max_steps=50,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        val_check_interval=25,  # every task has more than 25 batches an epoch; validate before max_steps
        callbacks=[recorder],
    )
    trainer.fit(model, dm)
    losses = recorder.losses
    assert len(losses) == 50
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_training_is_deterministic():
    def final_weights():
        L.seed_everything(1)
        model = DigitsMLP(hidden=32)
        trainer = L.Trainer(
            max_steps=10,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, DigitsDataModule(batch_size=16))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(final_weights(), final_weights(), rtol=0, atol=0)
