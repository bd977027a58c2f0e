"""The docs site's docstring converter (scripts/griffe_rst.py): reStructuredText markup in, Markdown out.

The site itself is built with `mkdocs build --strict` by `./run test`; these tests pin the conversions it relies on.
"""

import doctest
import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def griffe_rst():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_rst", ROOT / "scripts" / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(name):
    known = {"GradientNoiseScale": "lightning_gns.metric.GradientNoiseScale", "update": "x.update"}
    return known.get(name, name if name.startswith("lightning_gns") else None)


def test_roles_become_cross_references_or_code(griffe_rst):
    text = (
        ":class:`~lightning_gns.GradientNoiseScale`, :class:`GradientNoiseScale`, :func:`gns_estimates`, "
        ":meth:`update`, :class:`~lightning.pytorch.Trainer`, ``x`` and :mod:`torch`"
    )
    out = griffe_rst.rst_to_markdown(text, _resolve)
    assert out == (
        '<autoref identifier="lightning_gns.GradientNoiseScale" optional><code>GradientNoiseScale</code></autoref>, '
        '<autoref identifier="lightning_gns.metric.GradientNoiseScale" optional><code>GradientNoiseScale</code>'
        "</autoref>, `gns_estimates()`, `update()`, `Trainer`, ``x`` and `torch`"
    )


def test_math_and_links(griffe_rst):
    text = textwrap.dedent(
        r"""
        Inline :math:`|G|^2` and a `link <https://example.org/a>`_.

        .. math::

            a = b
            c = d

        After.
        .. math:: x^2
        """
    ).strip()
    out = griffe_rst.rst_to_markdown(text)
    assert r"Inline \(|G|^2\) and a [link](https://example.org/a)." in out
    assert "\\[\na = b\nc = d\n\\]" in out
    assert "\\[\nx^2\n\\]" in out
    assert out.index("After.") > out.index("c = d")


def test_simple_table_with_header_overflow_and_continuation(griffe_rst):
    text = textwrap.dedent(
        """
        Intro:

        ========  =====  =====
        key       a      b
        ========  =====  =====
        ``k|1``   one|x  :math:`|G|^2`
        k2        wider than its column  two
        k3        three  first line
                         second line
        ========  =====  =====

        After.
        """
    ).strip()
    out = griffe_rst.rst_to_markdown(text).splitlines()
    table = [line for line in out if line.startswith("|")]
    assert table == [
        "| key | a | b |",
        "| --- | --- | --- |",
        r"| ``k|1`` | one\|x | \(\vert G\vert ^2\) |",
        "| k2 | wider than its column | two |",
        "| k3 | three | first line second line |",
    ]
    assert out[0] == "Intro:"
    assert out[-1] == "After."


def test_table_without_header(griffe_rst):
    text = "=====  =====\na      b\nc      d\n=====  ====="
    table = [line for line in griffe_rst.rst_to_markdown(text).splitlines() if line]
    assert table == ["| a | b |", "| --- | --- |", "| c | d |"]


def test_example_section_and_doctest_kept(griffe_rst):
    text = "Summary.\n\nExample::\n\n    >>> 1 + 1\n    2"
    out = griffe_rst.rst_to_markdown(text)
    assert out == "Summary.\n\nExamples:\n\n    >>> 1 + 1\n    2"
    assert doctest.testmod(griffe_rst).failed == 0  # the converter's own example


def test_every_docstring_of_the_package_converts(griffe_rst):
    """The package, loaded as mkdocstrings loads it, with the extension: no rST role or border is left."""
    import griffe

    package = griffe.load(
        "lightning_gns", search_paths=[ROOT / "src"], extensions=griffe.load_extensions(griffe_rst.RstToMarkdown)
    )
    seen = 0

    def visit(obj):
        nonlocal seen
        if obj.docstring is not None:
            seen += 1
            value = obj.docstring.value
            assert ":class:`" not in value
            assert ":math:`" not in value
            assert ".. math::" not in value
            assert "=====  ===" not in value
        for member in obj.members.values():
            if not member.is_alias:
                visit(member)

    visit(package)
    assert seen > 100
    monitor = package["callbacks.noise_scale_monitor.NoiseScaleMonitor"].docstring.value
    assert '<autoref identifier="lightning_gns.metric.GradientNoiseScale" optional>' in monitor
    assert "| source | B_small | B_big | needs |" in monitor
