r"""Griffe extension for the docs site: the reStructuredText markup of our docstrings, as Markdown.

The docstrings are Google style with the inline markup of the Lightning and torchmetrics docstrings (``code``,
``:class:`~lightning_gns.GradientNoiseScale```, ``:math:`|G|^2```, ``.. math::`` blocks, simple tables), which
reads well in ``help()`` and an editor. mkdocstrings renders docstrings as Markdown, so before they are parsed this
extension rewrites, in every docstring of the package:

- ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:attr:``, ``:mod:``, ... to a cross-reference to the object where
  it is in ``lightning_gns`` (a name is looked up from the docstring's scope, as Python would), and to code
  otherwise; the link falls back to plain code, without a warning, when the object is not on any page;
- ``:math:`x``` to ``\(x\)`` and ``.. math::`` blocks to ``\[ ... \]`` (pymdownx.arithmatex, then MathJax);
- simple tables (``====  ====`` borders, continuation lines) to Markdown tables;
- ``Example::`` to the ``Examples:`` section of the Google style (doctest lines become code blocks);
- `` `text <url>`_ `` links to Markdown links.

mkdocs.yml loads it with ``extensions: [scripts/griffe_rst.py:RstToMarkdown]``; tests import :func:`rst_to_markdown`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import griffe

__all__ = ["RstToMarkdown", "rst_to_markdown"]

Resolver = Callable[[str], str | None]

_INLINE = re.compile(
    r"(?P<code>``[^`]+``)"
    r"|:(?:py:)?(?P<kind>class|func|meth|attr|mod|data|obj|exc|math):`(?P<body>[^`]+)`"
    r"|(?P<pipe>\|)"
)
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`__?")
_BORDER = re.compile(r"^(\s*)=+(?: +=+)+\s*$")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_EXAMPLE = re.compile(r"^(\s*)(Examples?)::\s*$")


def _no_resolver(name: str) -> str | None:
    return None


def _reference(role: str, target: str, resolve: Resolver) -> str:
    short = target.startswith("~")
    target = target.lstrip("~.")
    if role == "meth" or role == "func":
        target = target.removesuffix("()")
    shown = target.rsplit(".", 1)[-1] if short else target
    if role in ("func", "meth"):
        shown += "()"
    path = resolve(target)
    if path is not None and (path == "lightning_gns" or path.startswith("lightning_gns.")):
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'
    return f"`{shown}`"


def _inline(text: str, resolve: Resolver, in_table: bool = False) -> str:
    """Roles, inline math and links of one piece of text; in a table cell, bare pipes are escaped."""

    def sub(match: re.Match[str]) -> str:
        if match["code"]:  # code spans stay as they are (Markdown tables do not split inside them)
            return match["code"]
        if match["pipe"]:
            return r"\|" if in_table else "|"
        kind, body = match["kind"], match["body"]
        if kind == "math":
            body = " ".join(body.split())
            if in_table:  # a bare | would end the cell; \vert is the same bar to TeX
                body = body.replace("|", r"\vert ")
            return rf"\({body}\)"
        return _reference(kind, body, resolve)

    return _INLINE.sub(sub, _LINK.sub(r"[\1](\2)", text))


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, columns: list[tuple[int, int]]) -> list[str]:
    """Cells of a row: split on runs of two spaces (tolerates text overflowing its column) or by position."""
    split = re.split(r"\s{2,}", line.strip())
    if len(split) == len(columns) and line[: columns[0][1]].strip():
        return split
    starts = [start for start, _ in columns] + [None]
    return [line[starts[k] : starts[k + 1]].strip() for k in range(len(columns))]


def _table(lines: list[str], resolve: Resolver) -> list[str]:
    """A simple rST table (its lines, borders included) as a Markdown table."""
    indent = re.match(r"\s*", lines[0]).group(0)  # type: ignore[union-attr]
    columns = _columns(lines[0])
    borders = [i for i, line in enumerate(lines) if _BORDER.match(line)]
    has_header = len(borders) >= 3
    rows: list[list[str]] = []
    header_rows = 0
    for i, line in enumerate(lines):
        if _BORDER.match(line):
            if has_header and i == borders[1]:
                header_rows = len(rows)
            continue
        if not line.strip():
            continue
        cells = _cells(line, columns)
        if rows and not cells[0]:  # a continuation line: its text belongs to the row above
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    if not has_header or header_rows == 0:
        header, body = rows[:1], rows[1:]
    else:
        header, body = rows[:header_rows], rows[header_rows:]
    head = [" ".join(column).strip() for column in zip(*header, strict=True)]

    def row(cells: list[str]) -> str:
        return indent + "| " + " | ".join(_inline(cell, resolve, in_table=True) for cell in cells) + " |"

    return ["", row(head), indent + "|" + "|".join(" --- " for _ in head) + "|", *(row(r) for r in body), ""]


def rst_to_markdown(text: str, resolve: Resolver = _no_resolver) -> str:
    r"""Rewrite the reStructuredText markup of a docstring as Markdown (see the module docstring).

    Args:
        text: the docstring, dedented.
        resolve: maps a name as written in a role to the full path of the object, or ``None`` if unknown.

    Returns:
        The docstring in Markdown.

    Example::

        >>> print(rst_to_markdown(":math:`|G|^2` of :class:`~torch.Tensor`"))
        \(|G|^2\) of `Tensor`
    """
    lines = text.splitlines()
    out: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            out.extend(_inline("\n".join(prose), resolve).split("\n"))
            prose.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _BORDER.match(line):
            # A simple table: borders at the top, after the header (optional) and at the bottom.
            end, seen = i + 1, 1
            while end < len(lines) and seen < 3:
                if _BORDER.match(lines[end]):
                    seen += 1
                    nxt = end + 1
                    if seen == 2 and (nxt >= len(lines) or not lines[nxt].strip()):
                        break  # no header: the second border closes the table
                end += 1
            flush()
            out.extend(_table(lines[i : end + 1], resolve))
            i = end + 1
            continue
        math = _MATH_DIRECTIVE.match(line)
        if math:
            flush()
            indent, body = math.group(1), [math.group(2)] if math.group(2).strip() else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                body.append(lines[i].strip())
                i += 1
            body = [b for b in body if b]
            out.extend(["", indent + r"\[", *(indent + b for b in body), indent + r"\]", ""])
            continue
        example = _EXAMPLE.match(line)
        if example:
            flush()
            out.append(f"{example.group(1)}Examples:")
            i += 1
            continue
        prose.append(line)
        i += 1
    flush()
    return "\n".join(out).strip("\n")


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package with :func:`rst_to_markdown` once the tree is built."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Convert ``obj``'s docstring, resolving names in its scope."""
        if obj.docstring is None:
            return

        def resolve(name: str) -> str | None:
            # A name in the docstring's scope (as Python would see it), else an absolute path; then the object's
            # canonical path, under which mkdocstrings registers it wherever it is rendered.
            head, _, rest = name.partition(".")
            try:
                path = obj.resolve(head)
                path = f"{path}.{rest}" if rest else path
            except Exception:  # griffe's NameResolutionError: not a name in scope
                path = name
            try:
                return loader.modules_collection[path].canonical_path
            except Exception:  # not loaded (another package), or an alias to one
                return path if path.startswith("lightning_gns") else None

        obj.docstring.value = rst_to_markdown(obj.docstring.value, resolve)
