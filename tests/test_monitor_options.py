"""Bad options of NoiseScaleMonitor stop at construction (or before the first batch), naming the option."""

from __future__ import annotations

import math

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_gns import NoiseScaleMonitor
from tests.helpers.ground_truth import Classifier, make_dataset, make_net, quiet_trainer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"horizon_examples": math.inf}, r"`horizon_examples` to be a finite number > 0.*inf"),
        ({"horizon_examples": math.nan}, r"`horizon_examples`.*nan"),
        ({"horizon_examples": 0}, r"`horizon_examples`"),
        ({"log_every_n_steps": 2.5}, r"`log_every_n_steps` to be an int >= 1.*2\.5"),
        ({"log_every_n_steps": True}, r"`log_every_n_steps`.*True"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps`"),
        ({"b_crit_factor": math.inf}, r"`b_crit_factor`"),
        ({"grow_batch_size": True, "growth_policy": "foo"}, r"`growth_policy` to be one of.*'foo'"),
        ({"grow_batch_size": True, "max_micro_batch_size": 0}, r"`max_micro_batch_size` to be an int >= 1"),
        ({"grow_batch_size": True, "max_batch_size": 64.5}, r"`max_batch_size` to be an int >= 1"),
        ({"grow_batch_size": True, "min_examples_between_changes": math.inf}, r"`min_examples_between_changes`"),
        ({"growth_policy": "sqrt"}, r"act only with `grow_batch_size=True`"),
        ({"max_micro_batch_size": 16}, r"act only with `grow_batch_size=True`"),
    ],
)
def test_bad_options_raise_when_the_monitor_is_built(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        NoiseScaleMonitor(**kwargs)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:NoiseScaleMonitor has no logger")
def test_micro_batch_cap_below_the_starting_batch_stops_before_training():
    monitor = NoiseScaleMonitor(grow_batch_size=True, max_micro_batch_size=8)
    trainer = quiet_trainer(max_steps=3, callbacks=[monitor])
    with pytest.raises(MisconfigurationException, match=r"max_micro_batch_size=8.*batch_size=32.*batch_size <= 8"):
        trainer.fit(Classifier(make_net(), lr=0.1), DataLoader(make_dataset(), batch_size=32))
    assert trainer.global_step == 0
