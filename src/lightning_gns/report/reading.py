"""Read a run's logs (TensorBoard event files or a CSVLogger ``metrics.csv``) into one table of scalar series.

Event files are read with TensorBoard's own :class:`~tensorboard.backend.event_processing.event_accumulator.
EventAccumulator` (every scalar kept, restarts purged as TensorBoard does); before that, each file's record framing
is walked, because TensorBoard's reader silently stops at a half-written record. ``metrics.csv`` is read with the
:mod:`csv` module; a row whose width differs from the header's, or a value that is not a number, is an error.
"""

from __future__ import annotations

import csv
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from lightning_gns import tags
from lightning_gns.report.errors import ReportError

LogKind = Literal["tensorboard", "csv"]
LogChoice = Literal["auto", "tensorboard", "csv"]
LOG_CHOICES: tuple[LogChoice, ...] = ("auto", "tensorboard", "csv")

_EVENT_FILE_MARK = "tfevents"
_CSV_NAME = "metrics.csv"
_EXPECTED = "TensorBoard event files or a CSVLogger metrics.csv"


class Series(NamedTuple):
    """One logged scalar over training: ``steps`` (int64, increasing, unique) and ``values`` (float64)."""

    steps: np.ndarray
    values: np.ndarray

    def last(self) -> float:
        """The last logged value (NaN for an empty series)."""
        return float(self.values[-1]) if len(self.values) else math.nan

    def at(self, step: int) -> float:
        """The value in force at ``step``: the last one logged at or before it (NaN before the first)."""
        index = int(np.searchsorted(self.steps, step, side="right")) - 1
        return float(self.values[index]) if index >= 0 else math.nan

    def on(self, steps: np.ndarray, exact: bool = False) -> np.ndarray:
        """The values at ``steps``: in force there (:meth:`at`), or, with ``exact``, logged there (NaN if not)."""
        index = np.searchsorted(self.steps, steps, side="right") - 1
        found = index >= 0
        if exact:
            found &= self.steps[index.clip(0)] == steps
        return (
            np.where(found, self.values[index.clip(0)], math.nan) if len(self.steps) else np.full(len(steps), math.nan)
        )


@dataclass(frozen=True)
class RunLog:
    """The scalars of one run, as one table: tag → :class:`Series`, plus where they came from.

    Attributes:
        log_dir: the directory the logs were read from.
        kind: ``"tensorboard"`` or ``"csv"``.
        files: the files read (event files in the order TensorBoard reads them, or the ``metrics.csv``).
        scalars: every scalar tag of the run, the noise-scale ones and any other.
        hparams: the ``hparams.yaml`` beside the logs, when there is a readable one.
        prefix: the monitor's ``log_key_prefix``.
        same_run: other logs of the same run (a second logger of the same Trainer), not read.
        also_found: log directories under the directory searched without any ``prefix`` tag.
    """

    log_dir: Path
    kind: LogKind
    files: tuple[Path, ...]
    scalars: Mapping[str, Series]
    hparams: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = tags.DEFAULT_PREFIX
    same_run: tuple[Path, ...] = ()
    also_found: tuple[Path, ...] = ()

    def get(self, name: str) -> Series | None:
        """The series of ``prefix + name`` (for example ``"b_simple"``), or None when it was not logged."""
        return self.scalars.get(self.prefix + name)

    def last(self, name: str) -> float:
        """The last value of ``prefix + name``; NaN when it was not logged."""
        series = self.get(name)
        return math.nan if series is None else series.last()

    @property
    def layer_names(self) -> list[str]:
        """The layers with a per-layer B_simple (``prefix + "layer/<name>/b_simple"``), in logged order."""
        head, tail = self.prefix + tags.LAYER_HEAD, tags.LAYER_TAIL
        return [tag[len(head) : -len(tail)] for tag in self.scalars if tag.startswith(head) and tag.endswith(tail)]


def read_run(run_dir: str | os.PathLike[str], logs: LogChoice = "auto", prefix: str = tags.DEFAULT_PREFIX) -> RunLog:
    r"""Find the run's logs under ``run_dir`` (searched recursively) and read them.

    ``run_dir`` may be a logger's version directory, any parent of one, or a log file itself. Every log directory
    found is read; those without any ``prefix`` tag are passed over (and listed in :attr:`RunLog.also_found`).
    Logs with the same B_simple series (steps and values) are one run logged twice: TensorBoard is read
    (``logs="auto"``) and the CSV listed in :attr:`RunLog.same_run`. Two or more different runs are an error that
    lists them.

    Args:
        run_dir: where to look.
        logs: ``"auto"``, or read only ``"tensorboard"`` or only ``"csv"`` logs.
        prefix: the monitor's ``log_key_prefix``.

    Returns:
        The run's scalars and where they came from.

    Raises:
        ReportError: missing directory, no logs, an empty, truncated or malformed log file, no ``prefix`` tags,
            or several runs.

    Example::

        >>> import tempfile, pathlib
        >>> from lightning_gns.report import read_run
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.csv").write_text("gns/b_simple,gns/batch_size,step\n40.5,32,9\n,,10\n52.0,32,19\n")
        >>> log = read_run(run)
        >>> log.kind, log.get(tags.B_SIMPLE).steps.tolist(), log.last(tags.B_SIMPLE)
        ('csv', [9, 19], 52.0)
    """
    if logs not in LOG_CHOICES:
        raise ReportError(f"Expected `logs` to be one of {LOG_CHOICES}, got {logs!r}.")
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"{root}: no such directory; expected a run's log directory ({_EXPECTED})")
    found = _find_log_dirs(root)
    if not found:
        raise ReportError(f"{root}: no log files found (searched recursively); expected {_EXPECTED}")
    wanted: list[LogKind] = ["tensorboard", "csv"] if logs == "auto" else [logs]
    candidates = [(path, kind) for kind in wanted for path, found_kind in found if found_kind == kind]
    if not candidates:
        names = ", ".join(str(path) for path, _ in found)
        raise ReportError(f"{root}: no {logs} logs found (only {names}); expected {_EXPECTED}")
    read = [_read_candidate(path, kind, prefix, several=len(candidates) > 1) for path, kind in candidates]
    tagged = [log for log in read if any(tag.startswith(prefix) for tag in log.scalars)]
    if not tagged:
        where = ", ".join(str(log.files[0] if len(read) == 1 else log.log_dir) for log in read)
        raise ReportError(
            f"{where}: no `{prefix}` tags; expected the scalars that NoiseScaleMonitor logs ({prefix}b_simple, ...)"
            " — was the monitor in the Trainer's callbacks, with a logger, for at least one logging period?"
        )
    for log in tagged:
        if log.get(tags.B_SIMPLE) is None:
            raise ReportError(
                f"{log.files[0]}: `{prefix}` tags but no `{prefix}b_simple`; expected NoiseScaleMonitor's scalars"
            )
    runs = _group_by_run(tagged)
    if len(runs) > 1:
        names = "; ".join(" + ".join(str(log.log_dir) for log in run) for run in runs)
        raise ReportError(f"{root}: {len(runs)} different runs with `{prefix}` tags ({names}); pass one of them")
    chosen, *copies = runs[0]  # candidates are in order of preference: TensorBoard first
    return RunLog(
        log_dir=chosen.log_dir,
        kind=chosen.kind,
        files=chosen.files,
        scalars=chosen.scalars,
        hparams=chosen.hparams,
        prefix=prefix,
        same_run=tuple(log.log_dir for log in copies),
        also_found=tuple(log.log_dir for log in read if log not in tagged),
    )


def _read_candidate(path: Path, kind: LogKind, prefix: str, several: bool) -> RunLog:
    try:
        return _read_log_dir(path, kind, prefix)
    except ReportError as err:
        if not several:
            raise
        raise ReportError(
            f"{err} (one of several log directories found: point RUN_DIR at another one, or choose the logs to "
            "read: tensorboard or csv)"
        ) from err


def _group_by_run(logs: list[RunLog]) -> list[list[RunLog]]:
    """Group logs that hold the same run: a TensorBoard and a CSV logger of one Trainer log the same values.

    Two logs are one run when every noise-scale tag they share has the same steps and the same values (to the
    float32 precision that TensorBoard stores).
    """
    runs: list[list[RunLog]] = []
    for log in logs:
        for run in runs:
            if _same_run(run[0], log):
                run.append(log)
                break
        else:
            runs.append([log])
    return runs


def _same_run(first: RunLog, second: RunLog) -> bool:
    shared = [tag for tag in first.scalars if tag.startswith(first.prefix) and tag in second.scalars]
    return all(_same_series(first.scalars[tag], second.scalars[tag]) for tag in shared)


def _same_series(first: Series, second: Series) -> bool:
    return bool(
        np.array_equal(first.steps, second.steps)
        and np.allclose(first.values, second.values, rtol=1e-6, atol=0, equal_nan=True)
    )


def _is_event_file(path: Path) -> bool:
    return _EVENT_FILE_MARK in path.name and path.is_file()


def _find_log_dirs(root: Path) -> list[tuple[Path, LogKind]]:
    """Directories holding event files or a ``metrics.csv`` (a file given directly counts as its directory)."""
    if root.is_file():
        if _is_event_file(root):
            return [(root, "tensorboard")]
        if root.suffix == ".csv":
            return [(root, "csv")]
        raise ReportError(f"{root}: not a log file; expected a directory, an event file or a metrics.csv")
    found: dict[tuple[Path, LogKind], None] = {}
    for directory, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if _EVENT_FILE_MARK in name:
                found[(Path(directory), "tensorboard")] = None
            elif name == _CSV_NAME:
                found[(Path(directory), "csv")] = None
    return list(found)


def _read_log_dir(path: Path, kind: LogKind, prefix: str) -> RunLog:
    """Read one log directory (or the one log file given), all of its event files when it holds several."""
    if path.is_file():
        directory, files = path.parent, [path]
    elif kind == "csv":
        directory, files = path, [path / _CSV_NAME]
    else:
        directory, files = path, sorted(p for p in path.iterdir() if _is_event_file(p))
    scalars = _read_tensorboard(directory, files) if kind == "tensorboard" else _read_csv(files[0], prefix)
    return RunLog(
        log_dir=directory,
        kind=kind,
        files=tuple(files),
        scalars=scalars,
        hparams=_read_hparams(directory),
        prefix=prefix,
    )


# -- TensorBoard -----------------------------------------------------------------------------------------------------


def check_event_file(path: Path) -> int:
    """Walk the record framing of an event file; return the number of records.

    A TFRecord is a little-endian ``uint64`` length, a ``uint32`` checksum of it, the data and a ``uint32``
    checksum of the data. A file that ends inside a record was cut short (a run still writing, or killed mid-write):
    TensorBoard's reader would stop there without a word.

    Raises:
        ReportError: an empty file, or one that ends inside a record.
    """
    size = path.stat().st_size
    if size == 0:
        raise ReportError(
            f"{path}: empty event file (0 bytes); expected TensorBoard records — the run may have stopped before "
            "its first flush"
        )
    records, offset = 0, 0
    with path.open("rb") as handle:
        while offset < size:
            header = handle.read(12)
            if len(header) < 12:
                raise _truncated(path, offset, size, "a record header")
            (length,) = struct.unpack("<Q", header[:8])
            end = offset + 12 + length + 4
            if end > size:
                raise _truncated(path, offset, size, f"{length + 4} bytes of record data")
            handle.seek(length + 4, os.SEEK_CUR)
            offset, records = end, records + 1
    return records


def _truncated(path: Path, offset: int, size: int, expected: str) -> ReportError:
    return ReportError(
        f"{path}: truncated event file (half-written record at byte {offset} of {size}); expected {expected} "
        "there — was the run still writing, or killed mid-write?"
    )


def _read_tensorboard(directory: Path, files: list[Path]) -> dict[str, Series]:
    # Imported here: TensorBoard's reader takes a fifth of a second to import, and CSV runs do not need it.
    from tensorboard.backend.event_processing import event_accumulator

    if not files:
        raise ReportError(f"{directory}: no event files; expected {_EXPECTED}")
    for path in files:
        check_event_file(path)
    # One file: read just it (the one given, or the directory's only one); several: the directory, in order.
    target = files[0] if len(files) == 1 else directory
    accumulator = event_accumulator.EventAccumulator(str(target), size_guidance={event_accumulator.SCALARS: 0})
    try:
        accumulator.Reload()
    except Exception as err:  # a record that frames correctly but does not decode: say which directory
        raise ReportError(
            f"{target}: unreadable event data ({type(err).__name__}: {err}); expected Event protos"
        ) from err
    scalars: dict[str, Series] = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        scalars[tag] = _series((event.step for event in events), (event.value for event in events))
    return scalars


def _series(steps: Iterator[int] | Any, values: Iterator[float] | Any) -> Series:
    """Sorted by step; where a step was logged twice (a resumed run), the value written last wins."""
    by_step = dict(zip(steps, values, strict=True))
    ordered = sorted(by_step)
    return Series(np.asarray(ordered, dtype=np.int64), np.asarray([by_step[s] for s in ordered], dtype=np.float64))


# -- CSV -------------------------------------------------------------------------------------------------------------


def _read_csv(path: Path, prefix: str) -> dict[str, Series]:
    """A CSVLogger file: a ``step`` column and one column per metric, a blank where a row did not log it."""
    where = f"{path}"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{where}: not a readable CSV file ({err}); expected CSVLogger's metrics.csv") from err
    rows = [row for row in rows if row]
    if not rows:
        raise ReportError(f"{where}: empty CSV file; expected a header row with a `step` column (CSVLogger)")
    header = rows[0]
    if "step" not in header:
        shown = ", ".join(header[:4]) + (", ..." if len(header) > 4 else "")
        raise ReportError(f"{where}: no `step` column in the header ({shown}); expected CSVLogger's metrics.csv")
    step_column = header.index("step")
    columns: dict[str, dict[int, float]] = {name: {} for name in header if name != "step"}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ReportError(
                f"{where}, line {line}: {len(row)} fields where the header has {len(header)}; expected one value "
                "(or a blank) per column — a malformed or half-written metrics.csv"
            )
        step_text = row[step_column]
        try:
            step = int(float(step_text))
        except ValueError:
            raise ReportError(
                f"{where}, line {line}: step {step_text!r} is not a number; expected an integer step"
            ) from None
        for name, text in zip(header, row, strict=True):
            if name == "step" or text == "":
                continue
            try:
                columns[name][step] = float(text)
            except ValueError:
                if name.startswith(prefix):
                    raise ReportError(
                        f"{where}, line {line}, column {name!r}: {text!r} is not a number; expected a float"
                    ) from None
    return {name: _series(by_step.keys(), by_step.values()) for name, by_step in columns.items() if by_step}


# -- hparams ---------------------------------------------------------------------------------------------------------


def _read_hparams(directory: Path) -> dict[str, Any]:
    """The ``hparams.yaml`` that Lightning's loggers write beside the logs; empty if absent or not plain YAML."""
    path = directory / "hparams.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}  # Lightning may write Python-object tags that plain YAML cannot load: treat as not recorded.
    return loaded if isinstance(loaded, dict) else {}


def find_hparam(hparams: Mapping[str, Any], *names: str) -> Any:
    """The first non-None value of a key named one of ``names`` (or ending in ``.name``), searched depth-first.

    Example::

        >>> find_hparam({"model": {"lr": 0.1}, "gns": {"horizon_examples": 3200}}, "horizon_examples")
        3200
    """
    for key, value in hparams.items():
        if isinstance(value, Mapping):
            found = find_hparam(value, *names)
            if found is not None:
                return found
        elif str(key).rsplit(".", 1)[-1] in names and value is not None:
            return value
    return None
