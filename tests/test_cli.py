"""The command line: `lightning-gns fit` on the shipped configs, the monitor in any LightningCLI, the demo."""

import csv
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from torch import nn
from torch.utils.data import DataLoader

from lightning_gns import NoiseScaleMonitor
from lightning_gns.cli import GNSLightningCLI, main, run
from lightning_gns.demo.runner import TASKS, config_path, demo_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
CHARLM = str(ROOT / "configs" / "charlm.yaml")
QUIET = ["--trainer.enable_progress_bar=false"]


def _monitors(trainer):
    return [c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor)]


def _tensorboard_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_repository_configs_are_the_packaged_ones():
    for task in TASKS:
        assert (ROOT / "configs" / f"{task}.yaml").resolve() == config_path(task).resolve()
    with pytest.raises(ValueError, match="`task` to be one of"):
        config_path("mnist")


def test_fit_digits_config_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config logs to runs/demo/digits, relative to the working directory
    code = main(["fit", "--config", DIGITS, "--trainer.max_steps=12", "--trainer.log_every_n_steps=4", *QUIET])
    assert code == 0
    log_dir = tmp_path / "runs" / "demo" / "digits"
    with open(log_dir / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["gns/b_simple"]]
    assert [int(row["step"]) for row in rows] == [3, 7, 11]
    assert float(rows[-1]["gns/batch_size"]) == 32
    assert float(rows[-1]["gns/examples"]) == 12 * 32
    tags = _tensorboard_tags(log_dir)
    assert {"gns/b_simple", "gns/b_simple_lower", "gns/b_simple_upper", "gns/b_crit", "gns/grad_sq_norm"} <= tags
    assert "train/loss" in tags
    # The run's full config is kept beside its logs, the command-line overrides included.
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 12
    assert saved["trainer"]["callbacks"][0]["class_path"] == "lightning_gns.NoiseScaleMonitor"


def test_monitor_options_come_from_the_yaml_and_the_command_line(tmp_path):
    cli = GNSLightningCLI(
        args=["--config", DIGITS, "--trainer.callbacks.source=per_example", "--trainer.callbacks.per_layer=true"],
        run=False,
    )
    (monitor,) = _monitors(cli.trainer)
    assert monitor.source_name == "per_example"
    assert monitor.per_layer
    assert monitor.prog_bar  # from the YAML
    assert monitor.confidence == 0.9
    assert monitor.horizon_examples is None


def test_charlm_config_links_the_vocabulary_size():
    cli = GNSLightningCLI(args=["--config", CHARLM, "--data.init_args.max_chars=20000"], run=False)
    vocab_size = cli.datamodule.vocab_size
    assert cli.model.hparams["vocab_size"] == vocab_size
    assert cli.model.net.tok_emb.num_embeddings == cli.model.net.head.out_features == vocab_size
    assert len(_monitors(cli.trainer)) == 1


class _BatchedData(BoringDataModule):
    """Lightning's BoringDataModule, with batches of 8 (its own are single examples: no small batch to compare)."""

    def train_dataloader(self):
        return DataLoader(self.random_train, batch_size=8)


# Lightning warns that pytest's own argv is there too.
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_monitor_in_a_user_lightning_cli(tmp_path):
    """`--trainer.callbacks+=lightning_gns.NoiseScaleMonitor` in a LightningCLI that knows nothing of lightning-gns."""
    args = [
        "fit",
        "--trainer.callbacks+=lightning_gns.NoiseScaleMonitor",
        "--trainer.callbacks.source=per_example",
        "--trainer.callbacks.horizon_examples=256",
        "--trainer.callbacks.per_example_include=[torch.nn.Linear]",
        "--trainer.callbacks.log_every_n_steps=2",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",
        *QUIET,
    ]
    cli = LightningCLI(BoringModel, _BatchedData, args=args)
    (monitor,) = _monitors(cli.trainer)
    assert monitor.source_name == "per_example"
    assert monitor.horizon_examples == 256
    assert monitor.per_example_include == (nn.Linear,)
    assert cli.trainer.global_step == 4
    assert set(monitor.estimates) >= {"b_simple", "trace_sigma", "grad_sq_norm"}


def _config_with_monitor_option(tmp_path: Path, key: str, value: object) -> str:
    config = yaml.safe_load(Path(DIGITS).read_text())
    config["trainer"]["callbacks"][0]["init_args"][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sorce", "ddp", "Option 'sorce' is not accepted"),  # a typo in an option's name
        ("source", "dpp", "Got value: dpp"),  # a value the option does not take
        ("confidence", "high", "confidence"),
    ],
)
def test_bad_monitor_option_in_yaml_is_a_clear_error(tmp_path, monkeypatch, capsys, key, value, message):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", _config_with_monitor_option(tmp_path, key, value)])
    assert code == 2
    err = capsys.readouterr().err
    assert "lightning_gns.NoiseScaleMonitor" in err
    assert message in err
    assert "--trainer.max_epochs" not in err  # one usage line, not every Trainer option
    assert not (tmp_path / "runs").exists()


def test_console_script_exit_codes(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-gns", "fit", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    assert "missing.yaml" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["lightning-gns", "fit", "--help"])
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 0
    assert "--trainer.callbacks" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "fit", "validate"):
        assert command in out
    assert main([]) == 2


def test_demo_config_overrides(tmp_path):
    config = demo_config("charlm", out_dir=tmp_path, max_steps=80, batch_size=8, seed=3, progress_bar=False)
    assert config["trainer"]["max_steps"] == 80
    assert config["trainer"]["log_every_n_steps"] == 2
    assert {logger["init_args"]["save_dir"] for logger in config["trainer"]["logger"]} == {str(tmp_path)}
    assert config["data"]["init_args"]["batch_size"] == 8
    assert config["seed_everything"] == 3
    assert not config["trainer"]["enable_progress_bar"]
    # Without overrides the demo is the config (with a progress bar).
    plain, default = yaml.safe_load(Path(DIGITS).read_text()), demo_config("digits")
    assert default.pop("trainer") == {**plain.pop("trainer"), "enable_progress_bar": True}
    assert default == plain


def test_demo_runs_the_config_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--task", "digits", "--max-steps", "20", "--out", str(tmp_path), "--no-progress-bar"]) == 0
    out = capsys.readouterr().out
    assert "== digits: B_simple over training (batch size 32" in out
    assert f"Logs: tensorboard --logdir {tmp_path / 'digits'}" in out
    assert (tmp_path / "digits" / "csv" / "metrics.csv").is_file()
    assert (tmp_path / "digits" / "config.yaml").is_file()


@pytest.mark.parametrize("option", ["--max-steps", "--batch-size"])
def test_demo_rejects_non_positive_sizes(capsys, option):
    assert main(["demo", option, "0"]) == 2
    assert f"{option} must be >= 1" in capsys.readouterr().err
