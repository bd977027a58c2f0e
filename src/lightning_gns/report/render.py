"""``report.md`` and ``report.html`` from one list of blocks: what the run says, in words, tables and figures.

:func:`document` composes the blocks from a :class:`~lightning_gns.report.summary.RunSummary` and the figures;
:func:`to_markdown` and :func:`to_html` write them out. The HTML is one self-contained file: the PNGs are embedded
as base64 ``data:`` URIs, so it can be mailed or moved on its own. Inline text uses two Markdown marks only,
```code``` and ``**bold**``, which the HTML writer turns into ``<code>`` and ``<strong>``.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_gns.report.reading import RunLog
from lightning_gns.report.summary import RunSummary, format_number

if TYPE_CHECKING:  # the figures need matplotlib; the documents only their paths
    from lightning_gns.report.figures import FigureFile

_KIND_NAMES = {"tensorboard": "TensorBoard event file", "csv": "CSVLogger metrics.csv"}


@dataclass(frozen=True)
class Heading:
    """A section title (level 1 or 2)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of inline text."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of inline texts."""

    items: list[str]


@dataclass(frozen=True)
class Table:
    """A table of inline texts: a header row and the rows."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    """A PNG in the report directory, with its alternative text."""

    path: Path
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def document(log: RunLog, summary: RunSummary, figures: dict[str, FigureFile]) -> list[Block]:
    """The report's blocks: the suggestion and where it came from, then one section per figure."""
    key = log.prefix
    suggestion = summary.suggestion
    blocks: list[Block] = [Heading("Gradient noise scale report", level=1)]
    files = ", ".join(f"`{path}`" for path in log.files)
    kind = _KIND_NAMES[log.kind] + ("s" if len(log.files) > 1 else "")
    blocks.append(Paragraph(f"Run: `{log.log_dir}`. Read from the {kind} {files}."))
    if log.same_run:
        same = ", ".join(f"`{path}`" for path in log.same_run)
        blocks.append(Paragraph(f"The same run was also logged to {same} (same `{key}b_simple` values; not read)."))
    if log.also_found:
        other = ", ".join(f"`{path}`" for path in log.also_found)
        blocks.append(Paragraph(f"Also found under the directory searched, without `{key}` tags: {other}."))

    blocks.append(Heading("Suggestion"))
    if suggestion.resolved:
        power = suggestion.power_of_two
        value = f"**{format_number(suggestion.b_crit)}** (as a power of two: {power})"
    else:
        value = "none: B_simple is undefined at the last logged step (|G|² not resolved from zero)"
    interval = f"[{format_number(suggestion.lower)}, {format_number(suggestion.upper)}]"
    rows = [
        [f"Suggested batch size (`{key}b_crit`, last logged, step {suggestion.step})", value],
        [f"Interval of B_simple (`{key}b_simple_lower`, `{key}b_simple_upper`)", interval],
        [f"Smoothed B_simple there (`{key}b_simple`)", format_number(suggestion.b_simple)],
    ]
    factor = suggestion.factor
    if math.isfinite(factor) and not math.isclose(factor, 1.0, rel_tol=1e-6):
        scaled = f"[{format_number(factor * suggestion.lower)}, {format_number(factor * suggestion.upper)}]"
        rows.append([f"Interval of the suggestion (b_crit = {format_number(factor)} × B_simple)", scaled])
    rows += [
        [f"Batch size used there (`{key}batch_size`)", _batch_used(summary)],
        [f"Examples seen (`{key}examples`)", format_number(suggestion.examples)],
        ["Averaging window (the monitor's horizon)", summary.horizon_text],
        ["Gradient source", summary.gradient_source],
        ["Logs read (source of these numbers)", f"{_KIND_NAMES[log.kind]}: `{log.files[0]}`"],
        [f"Steps skipped (`{key}num_skipped`, non-finite gradients)", format_number(summary.num_skipped)],
        ["Learning-rate rule", summary.lr_text],
    ]
    blocks.append(Table(["quantity", "value"], rows))
    blocks += _reading_the_suggestion(summary)

    blocks += _figure_section(
        "B_simple over training",
        figures.get("b_simple"),
        (
            "The smoothed B_simple (a moving average of tr(Σ) divided by one of |G|², not an average of ratios) "
            "inside its interval, against the examples seen and against optimizer steps, with the batch size used on "
            "the same axes. Where B_simple sits well above the batch size, larger batches would still cut the steps "
            "almost in proportion."
        ),
    )
    if "noise" not in figures:
        blocks += [
            Heading("|G|² and tr(Σ)"),
            Paragraph(f"Not drawn: neither `{key}grad_sq_norm` nor `{key}trace_sigma` was logged."),
        ]
    blocks += _figure_section(
        "|G|² and tr(Σ)",
        figures.get("noise"),
        (
            "The two smoothed estimates whose ratio is B_simple, on a log scale: tr(Σ) is the per-example gradient "
            "noise, |G|² the squared norm of the true gradient. |G|² falling while tr(Σ) holds is B_simple growing."
        ),
    )
    if "layers" in figures:
        blocks += _figure_section(
            "Per-layer B_simple",
            figures["layers"],
            ("Each layer's own smoothed B_simple over training (rows: layers, in logged order; colour: log scale)."),
        )
    blocks += _trade_off_section(summary, figures.get("tradeoff"))
    if summary.batch_history:
        blocks += _batch_history_section(log, summary, figures.get("batch_size"))
    blocks.append(Paragraph("How to read each figure: `docs/report.md` in the lightning-gns repository."))
    return blocks


def _batch_used(summary: RunSummary) -> str:
    text = format_number(summary.batch_size)
    if summary.short_batches:
        text += (
            f" ({summary.short_batches} logged points fell on the short last batch of an epoch; they are not "
            "changes of the batch size)"
        )
    return text


def _reading_the_suggestion(summary: RunSummary) -> list[Block]:
    suggestion = summary.suggestion
    if not suggestion.resolved:
        return [
            Paragraph(
                "No suggestion yet: the |G|² estimate is not resolved from zero at the last logged step, so B_simple "
                "is undefined there. Train longer, or with a longer horizon."
            )
        ]
    text = (
        "B_simple ignores the curvature of the loss: papers found it 1.4–5× above the critical batch size that a "
        "sweep of fixed batch sizes finds, this project's growth benchmark 0.2–0.8× of it. Treat the suggestion as "
        "a guide to the batch size beyond which larger batches stop buying fewer steps, not as a law."
    )
    steps, examples = summary.predicted_at(summary.batch_size)
    if math.isfinite(steps):
        text += (
            f" At the batch size used ({format_number(summary.batch_size)}) the paper's model predicts "
            f"{steps:.3g}× the fewest possible optimizer steps and {examples:.3g}× the fewest possible examples."
        )
    if math.isinf(suggestion.upper):
        text += (
            " The interval is open above (+inf): |G|² is not yet resolved from zero, so the logs bound B_simple "
            "from below only."
        )
    return [Paragraph(text)]


def _figure_section(title: str, figure: FigureFile | None, caption: str) -> list[Block]:
    if figure is None:
        return []
    blocks: list[Block] = [Heading(title), Paragraph(caption), Image(figure.path, figure.title)]
    if figure.notes:
        blocks.append(Bullets([note[0].upper() + note[1:] + "." for note in figure.notes]))
    return blocks


def _trade_off_section(summary: RunSummary, figure: FigureFile | None) -> list[Block]:
    title = "Predicted trade-off"
    if not summary.trade_off or figure is None:
        return [Heading(title), Paragraph("Not drawn: B_noise (the final smoothed B_simple) is undefined.")]
    b_noise = summary.b_noise
    blocks = _figure_section(
        title,
        figure,
        (
            f"For B_noise = {format_number(b_noise)} (the final smoothed B_simple), McCandlish et al. (2018) predict "
            "that training at batch size B takes S/S_min = 1 + B_noise/B times the fewest possible optimizer steps "
            "and E/E_min = 1 + B/B_noise times the fewest possible examples. B = B_noise costs twice the minimum of "
            "both; a batch far below it wastes steps, one far above wastes examples."
        ),
    )
    used = summary.batch_size
    power = summary.suggestion.power_of_two
    rows = []
    for row in summary.trade_off:
        marks = []
        if math.isfinite(used) and row.batch_size == used:
            marks.append("used")
        if power is not None and row.batch_size == power:
            marks.append("nearest to the suggestion")
        rows.append([str(row.batch_size), f"{row.steps_ratio:.3g}", f"{row.examples_ratio:.3g}", ", ".join(marks)])
    blocks.append(Table(["batch size B", "steps S/S_min", "examples E/E_min", ""], rows))
    return blocks


def _batch_history_section(log: RunLog, summary: RunSummary, figure: FigureFile | None) -> list[Block]:
    key = log.prefix
    blocks = _figure_section(
        "Batch-size history",
        figure,
        (
            f"The batch size changed during the run (`{key}batch_size`); each row is a change, with the learning rate "
            f"(`{key}lr`) and the gradient accumulation (`{key}accumulate_grad_batches`) in force from then on."
        ),
    )
    rows = [
        [
            str(change.step),
            format_number(change.examples),
            format_number(change.batch_size),
            _recorded(change.lr),
            _recorded(change.accumulate_grad_batches),
        ]
        for change in summary.batch_history
    ]
    blocks.append(Table(["from step", "examples seen", "batch size", "learning rate", "accumulate_grad_batches"], rows))
    return blocks


def _recorded(value: float) -> str:
    return "not recorded" if math.isnan(value) else format_number(value)


# -- writers -----------------------------------------------------------------------------------------------------


def to_markdown(blocks: list[Block], base: Path) -> str:
    r"""Markdown text; images are linked by their path relative to ``base`` (the report directory).

    Example::

        >>> from pathlib import Path
        >>> print(to_markdown([Heading("Report", 1), Table(["a", "b"], [["|G|²", "`x`"]])], Path(".")))
        # Report
        <BLANKLINE>
        | a | b |
        | --- | --- |
        | \|G\|² | `x` |
        <BLANKLINE>
    """
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [_md_row(block.header), "| " + " | ".join("---" for _ in block.header) + " |"]
            lines += [_md_row(row) for row in block.rows]
            out.append("\n".join(lines))
        else:
            out.append(f"![{block.alt}]({_relative(block.path, base)})")
    return "\n\n".join(out) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2rem; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def to_html(blocks: list[Block], title: str = "Gradient noise scale report") -> str:
    """One self-contained HTML page; each image is embedded as a base64 ``data:`` URI.

    Example::

        >>> page = to_html([Paragraph("B = `gns/b_crit` is **large**")])
        >>> "<p>B = <code>gns/b_crit</code> is <strong>large</strong></p>" in page
        True
    """
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}"></figure>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
