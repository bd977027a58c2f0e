"""Smoke test of ``benchmarks/bench_models.py --quick`` on one model (needs the ``models`` extra)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.bench import loaded_bench

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    with loaded_bench("bench_models") as module:
        yield module


def test_quick_run_times_every_method_and_records_errors(bench, tmp_path):
    rows = bench.main(["--quick", "--models", "llama", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)])
    assert [r.method for r in rows] == list(bench.METHODS)
    for row in rows:
        # A method either ran (a time and a ratio to the plain step) or says why not: never a silent gap.
        assert (row.status == "ok" and row.ratio == row.ratio) or (row.status == "error" and row.detail)
    assert rows[0].status == "ok"
    assert rows[0].ratio == pytest.approx(1.0)
    saved = json.loads((tmp_path / "models_overhead.json").read_text())
    assert [r["method"] for r in saved["results"]] == list(bench.METHODS)
    assert saved["meta"]["sizes"]["hidden"] == bench.QUICK.hidden
    assert "| llama | engine |" in (tmp_path / "models_overhead.md").read_text()
