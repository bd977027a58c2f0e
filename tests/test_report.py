"""`lightning-gns report`: figures and documents from a real run's logs, numbers checked against the logs themselves."""

from __future__ import annotations

import base64
import csv
import math
import re
import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from torch.utils.data import DataLoader

from lightning_gns import NoiseScaleMonitor
from lightning_gns.cli import main
from lightning_gns.functional import suggested_batch_size
from lightning_gns.report import ReportError, make_report, read_run, summarize
from tests.helpers.ground_truth import Classifier, make_dataset, make_net

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:.*log_every_n_steps.*")

# Pixel sizes: figures.FIGURE_INCHES × 100 dpi (the per-layer heatmap is 3 in. high for up to 4 layers).
EXPECTED_SHAPES = {
    "b_simple.png": (500, 1300),
    "noise.png": (450, 900),
    "layers.png": (300, 1100),
    "tradeoff.png": (500, 1300),
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """40 steps of a small classifier with the monitor (per-layer too), logged to TensorBoard and to CSV."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=[TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")],
        callbacks=[NoiseScaleMonitor(source="per_example", per_layer=True, log_every_n_steps=5)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(make_net(), lr=0.1), DataLoader(make_dataset(), batch_size=16, shuffle=True))
    return root


def _event_file(root):
    (path,) = (root / "tb").rglob("events.out.tfevents.*")
    return path


def _tensorboard_last(path):
    """The last value of every scalar, read with TensorBoard's own reader (independently of the report)."""
    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


def _csv_last(path):
    """The last non-blank value of every column, read with the csv module."""
    last = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            last.update({key: float(value) for key, value in row.items() if value != ""})
    return last


def _table(report_md):
    """The report's quantity/value table as {first cell: second cell}."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", report_md, flags=re.MULTILINE)
    return dict(rows)


def _number(text):
    return float(re.search(r"-?(?:inf|nan|\d[\d.e+-]*)", text.replace("*", "")).group())


def _interval(text):
    low, high = re.fullmatch(r"\[(\S+), (\S+)\]", text).groups()
    return float(low), float(high)


def _row(table, start):
    (value,) = [value for key, value in table.items() if key.startswith(start)]
    return value


def _assert_png(path, shape):
    image = imread(path)
    assert image.shape[:2] == shape, path.name
    pixels = image.reshape(-1, image.shape[-1])
    assert pixels.var(axis=0).sum() > 0, f"{path.name} is blank"
    assert len(np.unique(pixels, axis=0)) > 20, f"{path.name} has next to no colours"


def test_report_from_tensorboard_matches_the_logs(real_run):
    out = make_report(real_run)
    assert out == real_run / "report"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["b_simple.png", "layers.png", "noise.png", "report.html", "report.md", "tradeoff.png"]
    for name, shape in EXPECTED_SHAPES.items():
        _assert_png(out / name, shape)

    event_file = _event_file(real_run)
    logged = _tensorboard_last(event_file)
    report = (out / "report.md").read_text()
    table = _table(report)
    suggestion = _row(table, "Suggested batch size (`gns/b_crit`")
    assert _number(suggestion) == pytest.approx(logged["gns/b_crit"], rel=1e-5)
    # The demo's rule (tested in test_functional.py), fed the logged values.
    power = suggested_batch_size(logged["gns/b_crit"], logged["gns/b_simple_lower"])  # b_crit_factor 1
    assert f"as a power of two: {power}" in suggestion
    low, high = _interval(_row(table, "Interval of B_simple"))
    assert low == pytest.approx(logged["gns/b_simple_lower"], rel=1e-5)
    assert high == pytest.approx(logged["gns/b_simple_upper"], rel=1e-5)
    assert low < logged["gns/b_simple"] < high
    assert _number(_row(table, "Steps skipped")) == logged["gns/num_skipped"] == 0
    assert _number(_row(table, "Batch size used")) == logged["gns/batch_size"] == 16
    assert _number(_row(table, "Examples seen")) == logged["gns/examples"] == 40 * 16
    assert _row(table, "Logs read") == f"TensorBoard event file: `{event_file}`"
    assert _row(table, "Gradient source") == "`per_example` (from hparams.yaml)"  # the monitor writes it
    # The monitor logs its horizon (the default: 100 steps × 16 examples).
    assert _row(table, "Averaging window") == "1600 examples (logged as `gns/horizon_examples`)"
    assert logged["gns/horizon_examples"] == 1600
    assert _row(table, "Learning-rate rule").startswith("fixed")
    # The CSV logger of the same Trainer is recognised as the same run, not a second one.
    assert f"The same run was also logged to `{real_run / 'csv' / 'version_0'}`" in report

    html = (out / "report.html").read_text()
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 4
    assert base64.b64decode(embedded[0]) == (out / "b_simple.png").read_bytes()
    assert "<code>gns/b_crit</code>" in html


def test_report_from_csv_matches_the_logs(real_run, tmp_path):
    metrics = real_run / "csv" / "version_0" / "metrics.csv"
    logged = _csv_last(metrics)
    out = make_report(real_run, out_dir=tmp_path, logs="csv")
    assert out == tmp_path
    table = _table((out / "report.md").read_text())
    assert _number(_row(table, "Suggested batch size")) == pytest.approx(logged["gns/b_crit"], rel=1e-5)
    low, high = _interval(_row(table, "Interval of B_simple"))
    assert (low, high) == (
        pytest.approx(logged["gns/b_simple_lower"], rel=1e-5),
        pytest.approx(logged["gns/b_simple_upper"], rel=1e-5),
    )
    assert _number(_row(table, "Steps skipped")) == logged["gns/num_skipped"]
    assert _row(table, "Logs read") == f"CSVLogger metrics.csv: `{metrics}`"
    # Both loggers hold the same numbers: the TensorBoard report and this one agree (float32 in the event file).
    tensorboard = _tensorboard_last(_event_file(real_run))
    assert logged["gns/b_crit"] == pytest.approx(tensorboard["gns/b_crit"], rel=1e-6)


def _synthetic_run(path, rows=40, grow=True, bad_early=3, infinite_early=8):
    """A CSV run with a growing batch (√ learning-rate rule), an unresolved start and a few |G|² ≤ 0."""
    path.mkdir(parents=True, exist_ok=True)
    header = [
        "step", "gns/b_simple", "gns/b_simple_lower", "gns/b_simple_upper", "gns/b_crit", "gns/batch_size",
        "gns/examples", "gns/grad_sq_norm", "gns/trace_sigma", "gns/num_skipped", "gns/lr",
        "gns/accumulate_grad_batches",
    ]  # fmt: skip
    lines, examples = [",".join(header)], 0
    for i in range(rows):
        step = 10 * i + 9
        batch = (32 if step < 100 else 64 if step < 250 else 128) if grow else 32
        examples += 10 * batch
        grad = 1.0 / (1 + step / 50) - (1.0 if i < bad_early else 0.0)
        trace = 60 + step / 4
        b_simple = trace / grad if grad > 0 else math.nan
        lower = b_simple / 2 if grad > 0 else 30.0
        upper = math.inf if i < infinite_early else b_simple * 2.5
        lr = 0.1 * math.sqrt(batch / 32)
        accumulate = 1 if batch < 128 else 2
        values = [step, b_simple, lower, upper, b_simple, batch, examples, grad, trace, int(i > 20), lr, accumulate]
        lines.append(",".join(str(v) for v in values))
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def test_growing_batch_history_lr_rule_and_clipped_band(tmp_path):
    run = _synthetic_run(tmp_path / "grow")
    out = make_report(run)
    assert (out / "batch_size.png").is_file()
    _assert_png(out / "batch_size.png", (400, 1000))
    _assert_png(out / "b_simple.png", EXPECTED_SHAPES["b_simple.png"])
    report = (out / "report.md").read_text()
    assert "| 9 | 320 | 32 | 0.1 | 1 |" in report
    assert "| 109 | 3840 | 64 | 0.141421 | 1 |" in report
    assert "| 259 | 14080 | 128 | 0.2 | 2 |" in report
    table = _table(report)
    assert _row(table, "Learning-rate rule") == (
        "learning rate 0.1 → 0.2 (`gns/lr`); observed lr ∝ B^0.50 (square-root scaling)"
    )
    assert _number(_row(table, "Steps skipped")) == 1
    assert _row(table, "Gradient source").startswith("not recorded")
    # What a log scale cannot show is said in words.
    assert "upper end is above the axis at 8 of 40 logged points (8 of them +inf" in report
    assert "B_simple is undefined (|G|² ≤ 0, logged NaN) at 3 of 40 points" in report
    assert "|G|²: 3 of 40 logged values are ≤ 0 or not finite and are not drawn" in report


def test_short_last_batches_of_epochs_are_not_batch_size_changes(tmp_path):
    run = tmp_path / "epochs"
    run.mkdir()
    rows = [(4, 32), (9, 30), (14, 32), (19, 32), (24, 30)]  # two logging steps fell on an epoch's short batch
    (run / "metrics.csv").write_text(
        "step,gns/b_simple,gns/b_simple_lower,gns/b_simple_upper,gns/batch_size\n"
        + "".join(f"{step},100,50,200,{batch}\n" for step, batch in rows)
    )
    log = read_run(run)
    summary = summarize(log)
    assert summary.batch_history == []
    assert summary.batch_size == 32
    assert summary.short_batches == 2
    assert summary.lr_text.startswith("fixed")


def test_scheduled_learning_rate_without_batch_sizes_draws_no_batch_figure(tmp_path):
    # gns/lr logged (an LR schedule, 0.1 / (1 + step): 0.02 at step 4, 0.0025 at 39) but no gns/batch_size: no
    # batch-size section, so no figure for it (drawing one used to fail on the missing batch sizes).
    run = tmp_path / "lr_only"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,gns/b_simple,gns/b_simple_lower,gns/b_simple_upper,gns/lr\n"
        + "".join(f"{step},100,50,200,{0.1 / (1 + step)}\n" for step in range(4, 40, 5))
    )
    out = make_report(run)
    assert not (out / "batch_size.png").exists()
    assert "batch_size.png" not in (out / "report.md").read_text()
    assert "learning rate 0.02 → 0.0025" in summarize(read_run(run)).lr_text


def _unresolved_run(path):
    """One logging step, |G|² not resolved yet: B_simple NaN, the interval open above."""
    path.mkdir()
    (path / "metrics.csv").write_text(
        "step,gns/b_simple,gns/b_simple_lower,gns/b_simple_upper,gns/b_crit,gns/batch_size\n4,nan,3.5,inf,nan,16\n"
    )
    return path


def test_unresolved_run_has_no_suggestion_and_no_trade_off(tmp_path):
    out = make_report(_unresolved_run(tmp_path / "early"))
    assert sorted(p.name for p in out.iterdir()) == ["b_simple.png", "report.html", "report.md"]
    _assert_png(out / "b_simple.png", EXPECTED_SHAPES["b_simple.png"])
    report = (out / "report.md").read_text()
    assert "none: B_simple is undefined at the last logged step" in report
    assert "| Interval of B_simple (`gns/b_simple_lower`, `gns/b_simple_upper`) | [3.5, inf] |" in report
    assert "Not drawn: B_noise (the final smoothed B_simple) is undefined." in report
    assert "Not drawn: neither `gns/grad_sq_norm` nor `gns/trace_sigma` was logged." in report


def test_cli_writes_the_report(tmp_path, capsys):
    run, out = _unresolved_run(tmp_path / "run"), tmp_path / "out"
    assert main(["report", str(run / "metrics.csv"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"report: {out / 'report.md'}",
        f"        {out / 'report.html'}",
        f"figure: {out / 'b_simple.png'}",
    ]
    assert (out / "report.html").is_file()


# -- bad input -------------------------------------------------------------------------------------------------------


def _no_gns_tags(path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    return path


def _empty_event_file(path):
    path.mkdir()
    (path / "events.out.tfevents.0.host.1.0").touch()
    return path


def _truncated_event_file(real_run):
    def make(path):
        path.mkdir()
        source = _event_file(real_run)
        target = path / source.name
        shutil.copy(source, target)
        with target.open("r+b") as handle:
            handle.truncate(source.stat().st_size - 7)
        return path

    return make


def _csv(text):
    def make(path):
        path.mkdir()
        (path / "metrics.csv").write_text(text)
        return path

    return make


def _two_runs(path):
    _synthetic_run(path / "a")
    _synthetic_run(path / "b", grow=False)
    return path


BAD_INPUTS = {
    "missing directory": (lambda path: path / "absent", r"absent: no such directory; expected a run's log directory"),
    "no logs": (lambda path: path.mkdir() or path, r"no log files found \(searched recursively\)"),
    "no gns tags": (_no_gns_tags, r"events\.out\.tfevents\.[^:]+: no `gns/` tags; expected the scalars"),
    "empty event file": (_empty_event_file, r"tfevents\.0\.host\.1\.0: empty event file \(0 bytes\)"),
    "truncated event file": (None, r"tfevents\.[^:]+: truncated event file \(half-written record at byte \d+"),
    "ragged csv": (
        _csv("step,gns/b_simple,gns/batch_size\n4,10.0,16\n9,12.0\n"),
        r"metrics\.csv, line 3: 2 fields where the header has 3",
    ),
    "non-number in csv": (
        _csv("step,gns/b_simple\n4,ten\n"),
        r"metrics\.csv, line 2, column 'gns/b_simple': 'ten' is not a number",
    ),
    "csv without step": (_csv("gns/b_simple,gns/batch_size\n10.0,16\n"), r"metrics\.csv: no `step` column"),
    "empty csv": (_csv(""), r"metrics\.csv: empty CSV file"),
    "csv without b_simple": (_csv("step,gns/batch_size\n4,16\n"), r"metrics\.csv: `gns/` tags but no `gns/b_simple`"),
    "two runs": (_two_runs, r"2 different runs with `gns/` tags \(\S+/a; \S+/b\); pass one of them"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case, real_run, tmp_path, capsys):
    make, pattern = BAD_INPUTS[case]
    if make is None:
        make = _truncated_event_file(real_run)
    run_dir = make(tmp_path / "run")
    with pytest.raises(ReportError, match=pattern):
        make_report(run_dir)
    assert not (run_dir / "report").exists()  # nothing written for a run that cannot be read

    assert main(["report", str(run_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lightning-gns report: error: ")
    assert re.search(pattern, lines[0])
    assert str(tmp_path) in lines[0]
    assert "Traceback" not in captured.err


def test_a_malformed_log_beside_good_ones_says_how_to_skip_it(real_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run / "tb", run / "tb")
    _csv("step,gns/b_simple\n4,10.0\n9\n")(run / "csv")
    with pytest.raises(ReportError, match=r"line 3: 1 fields .*one of several log directories found"):
        read_run(run)
    assert read_run(run, logs="tensorboard").kind == "tensorboard"


def test_a_half_written_record_is_caught_at_every_byte(real_run, tmp_path):
    """Every cut inside the last record is found, and only a cut on a record boundary reads as complete."""
    from lightning_gns.report.reading import check_event_file

    source = _event_file(real_run).read_bytes()
    records = check_event_file(_event_file(real_run))
    assert records > 10
    target = tmp_path / "events.out.tfevents.1.host"
    offsets = [0]
    while offsets[-1] < len(source):
        length = int.from_bytes(source[offsets[-1] : offsets[-1] + 8], "little")
        offsets.append(offsets[-1] + 12 + length + 4)
    assert offsets[-1] == len(source)
    assert len(offsets) - 1 == records
    for cut in range(offsets[-2] + 1, len(source)):
        target.write_bytes(source[:cut])
        with pytest.raises(ReportError, match="truncated event file"):
            check_event_file(target)
    target.write_bytes(source[: offsets[-2]])
    assert check_event_file(target) == records - 1
