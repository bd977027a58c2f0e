"""`BatchSizeGrowth` as a callback of its own: the same run as `NoiseScaleMonitor(grow_batch_size=True)`, in either
order in the callbacks, its own checkpoint state, and the errors of a growth without a monitor to follow."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_gns import BatchSizeGrowth, NoiseScaleMonitor, tags
from tests.helpers.growth import IndexedDataset, Recorder, ScriptedScheduler

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:NoiseScaleMonitor has no logger:RuntimeWarning",
    "ignore:.*the number of training batches.*",
)

SIZE = 90
SCRIPT = [(20, 8), (60, 24), (150, 48)]
MONITOR = {"source": "per_example", "log_every_n_steps": 2}


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_steps": 24,
    }
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _fit(callbacks, ckpt_path=None, **kwargs):
    model = Recorder()
    trainer = _trainer(callbacks, **kwargs)
    trainer.fit(model, DataLoader(IndexedDataset(SIZE), batch_size=4, shuffle=True), ckpt_path=ckpt_path)
    return model, trainer


def _growth(**kwargs) -> BatchSizeGrowth:
    return BatchSizeGrowth(batch_size_scheduler=ScriptedScheduler(4, SCRIPT), max_micro_batch_size=16, **kwargs)


@pytest.mark.parametrize("growth_first", [False, True])
def test_the_callback_runs_the_same_fit_as_the_monitor_flag(growth_first):
    flagged = NoiseScaleMonitor(
        grow_batch_size=True, batch_size_scheduler=ScriptedScheduler(4, SCRIPT), max_micro_batch_size=16, **MONITOR
    )
    expected, _ = _fit([flagged])

    monitor, growth = NoiseScaleMonitor(**MONITOR), _growth()
    model, trainer = _fit([growth, monitor] if growth_first else [monitor, growth])

    assert monitor.growth is growth
    assert [c["batch_size"] for c in growth.changes] == [8, 24, 48]
    assert growth.changes == flagged.growth.changes
    assert model.served == expected.served
    assert model.losses == expected.losses
    assert trainer.accumulate_grad_batches == 3


def test_the_flag_puts_its_growth_among_the_trainer_callbacks_once():
    monitor = NoiseScaleMonitor(grow_batch_size=True, batch_size_scheduler=ScriptedScheduler(4, SCRIPT), **MONITOR)
    _, trainer = _fit([monitor], max_steps=4)
    assert [type(c) for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor | BatchSizeGrowth)] == [
        NoiseScaleMonitor,
        BatchSizeGrowth,
    ]
    assert trainer.callbacks[trainer.callbacks.index(monitor) + 1] is monitor.growth


def test_the_callback_logs_its_quantities_in_the_monitor_rows(tmp_path):
    growth = _growth()
    _fit([NoiseScaleMonitor(**MONITOR), growth], max_steps=20, logger=CSVLogger(tmp_path, name="run"))
    lines = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    monitor_rows = [r for r in rows if r[f"gns/{tags.B_SIMPLE}"]]
    assert monitor_rows
    for row in monitor_rows:  # one row per logging step, the growth's quantities in it
        assert all(row[f"gns/{name}"] for name in tags.GROWTH)
    assert len(growth.changes) >= 2
    assert float(monitor_rows[-1]["gns/batch_size_changes"]) == len(growth.changes)


@pytest.mark.parametrize(("stop", "pending"), [(14, False), (16, True)])
def test_the_callback_resumes_from_its_own_checkpoint_state(tmp_path, stop, pending):
    full, _ = _fit([NoiseScaleMonitor(**MONITOR), _growth()])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    first, _ = _fit([NoiseScaleMonitor(**MONITOR), _growth(), checkpoint], max_steps=stop, enable_checkpointing=True)
    ckpt = next(tmp_path.glob(f"*step={stop}.ckpt"))
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    (own,) = (v for k, v in states.items() if "BatchSizeGrowth" in k)
    assert (own["pending"] is not None) == pending
    (monitor_state,) = (v for k, v in states.items() if "NoiseScaleMonitor" in k)
    assert monitor_state["growth"] is None  # not held twice

    growth = _growth()
    resumed, trainer = _fit([NoiseScaleMonitor(**MONITOR), growth], ckpt_path=str(ckpt))
    assert first.served + resumed.served == full.served
    assert first.losses + resumed.losses == full.losses
    assert trainer.accumulate_grad_batches == 3
    assert [c["batch_size"] for c in growth.changes] == [8, 24, 48]


def test_the_flagged_growth_is_checkpointed_inside_the_monitor_only(tmp_path):
    monitor = NoiseScaleMonitor(grow_batch_size=True, batch_size_scheduler=ScriptedScheduler(4, SCRIPT), **MONITOR)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    _fit([monitor, checkpoint], max_steps=8, enable_checkpointing=True)
    states = torch.load(next(tmp_path.glob("*step=8.ckpt")), weights_only=False)["callbacks"]
    assert not [k for k in states if "BatchSizeGrowth" in k]
    (monitor_state,) = (v for k, v in states.items() if "NoiseScaleMonitor" in k)
    assert monitor_state["growth"]["batch_size"] == 8


def test_growth_without_a_monitor_says_how_to_add_one():
    with pytest.raises(
        MisconfigurationException, match=r"one NoiseScaleMonitor, but the Trainer has 0.*monitor=\.\.\."
    ):
        _fit([_growth()], max_steps=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"growth_policy": "foo"}, r"`growth_policy` to be one of.*'foo'"),
        ({"max_batch_size": 0}, r"`max_batch_size` to be an int >= 1"),
        ({"lr_scaling": "cubic"}, r"`lr_scaling` to be one of"),
        ({"lr_warmup_steps": -1}, r"`lr_warmup_steps` to be an int >= 0"),
        ({"b_crit_factor": 0.0}, r"`b_crit_factor` to be a finite number > 0"),
    ],
)
def test_invalid_options_are_refused_when_built(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        BatchSizeGrowth(**kwargs)


def test_the_factor_is_the_monitors_unless_given():
    monitor = NoiseScaleMonitor(b_crit_factor=2.5)
    assert BatchSizeGrowth(monitor=monitor).factor == 2.5
    assert BatchSizeGrowth(monitor=monitor, b_crit_factor=0.5).factor == 0.5


def test_the_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "batch_size.md").read_text()
    block = text.split("<!-- runnable: tests/test_growth_callback.py runs this block -->\n```python\n", 1)[1]
    exec(compile(block.split("```", 1)[0], "docs/batch_size.md", "exec"), {})
    size, changes = capsys.readouterr().out.strip().splitlines()[-1].split(" ", 1)
    assert int(size) >= 4
    assert changes.startswith("[")
