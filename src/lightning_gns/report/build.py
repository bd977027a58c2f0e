"""``make_report``: read a run's logs, draw the figures and write ``report.md`` and ``report.html``."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_gns import tags
from lightning_gns.report.reading import LogChoice, read_run
from lightning_gns.report.render import document, to_html, to_markdown
from lightning_gns.report.summary import summarize

#: The figures a report may hold, by file stem; a report only writes those its logs support.
FIGURES = ("b_simple", "noise", "layers", "tradeoff", "batch_size")


def make_report(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    logs: LogChoice = "auto",
    prefix: str = tags.DEFAULT_PREFIX,
) -> Path:
    r"""Write the noise-scale report of a run: figures (PNG), ``report.md`` and ``report.html``.

    Figures: ``b_simple.png`` (B_simple in its interval, with the batch size used, against examples and steps),
    ``noise.png`` (|G|² and tr Σ, when logged), ``layers.png`` (per-layer heatmap, when per-layer tags were logged),
    ``tradeoff.png`` (the predicted steps/examples trade-off, when B_simple is defined at the end) and
    ``batch_size.png`` (when the batch size changed or a learning rate was logged). Figures of an earlier report
    in the same directory are removed first, so that none is left stale.

    Args:
        run_dir: a logger's version directory, a parent of one, or a log file (see :func:`read_run`).
        out_dir: where to write; ``run_dir/report`` by default (beside the log file when ``run_dir`` is one).
        logs: ``"auto"`` (TensorBoard preferred), ``"tensorboard"`` or ``"csv"``.
        prefix: the monitor's ``log_key_prefix``.

    Returns:
        The directory written.

    Raises:
        ReportError: when the logs are missing, unreadable, or hold no noise-scale tags (the message names the path).
        ModuleNotFoundError: without matplotlib (``pip install 'lightning-gns[report]'``).

    Example::

        >>> import tempfile, pathlib
        >>> from lightning_gns.report import make_report
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> header = "step,gns/b_simple,gns/b_simple_lower,gns/b_simple_upper,gns/b_crit,gns/batch_size,gns/examples"
        >>> rows = [f"{s},{90 + s},{40 + s},{'inf' if s < 30 else 300 + s},{90 + s},32,{32 * (s + 1)}"
        ...         for s in range(9, 100, 10)]
        >>> _ = (run / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
        >>> out = make_report(run)
        >>> sorted(path.name for path in out.iterdir())
        ['b_simple.png', 'report.html', 'report.md', 'tradeoff.png']
        >>> next(line for line in (out / "report.md").read_text().splitlines() if "b_crit" in line)
        '| Suggested batch size (`gns/b_crit`, last logged, step 99) | **189** (as a power of two: 256) |'
    """
    try:
        from lightning_gns.report import figures
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"The report draws its figures with matplotlib, which is not installed ({err.name} is missing): "
            "pip install 'lightning-gns[report]'",
            name=err.name,
        ) from err

    log = read_run(run_dir, logs=logs, prefix=prefix)
    summary = summarize(log)
    run_path = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else (run_path.parent if run_path.is_file() else run_path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:
        (out / f"{stem}.png").unlink(missing_ok=True)

    drawn = {"b_simple": figures.plot_b_simple(log, out / "b_simple.png")}
    if log.get(tags.GRAD_SQ_NORM) is not None or log.get(tags.TRACE_SIGMA) is not None:
        drawn["noise"] = figures.plot_noise_components(log, out / "noise.png")
    if log.layer_names:
        drawn["layers"] = figures.plot_layers(log, out / "layers.png")
    if summary.trade_off:
        drawn["tradeoff"] = figures.plot_tradeoff(summary, out / "tradeoff.png")
    if summary.batch_history:  # the report shows the batch-size section (and links this figure) only then
        drawn["batch_size"] = figures.plot_batch_size(log, out / "batch_size.png")

    blocks = document(log, summary, drawn)
    (out / "report.md").write_text(to_markdown(blocks, out), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks), encoding="utf-8")
    return out
