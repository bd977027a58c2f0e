"""Smoke test of ``benchmarks/bench_fusion.py --quick``: every model and method, and ``.grad`` agreeing."""

from __future__ import annotations

import json

import pytest

from tests.helpers.bench import loaded_bench


@pytest.fixture(scope="module")
def bench():
    with loaded_bench("bench_fusion") as module:
        yield module


def test_quick_run_times_every_method_and_checks_the_grads(bench, tmp_path):
    rows = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert [(r.model, r.method) for r in rows] == [(m, k) for m in bench.MODELS for k in bench.METHODS]
    by = {(r.model, r.method): r for r in rows}
    for row in rows:
        assert row.status == "ok", row.detail
        assert row.ratio == row.ratio  # a time and a ratio to the plain step
    for model in bench.MODELS:
        assert by[model, "plain"].ratio == pytest.approx(1.0)
        assert by[model, "fused"].ratio_unfused == by[model, "fused"].ratio_unfused
        # Fusion off leaves autograd alone; on, the sums of the per-example gradients agree to float32 rounding.
        assert by[model, "unfused"].grad_bitwise_equal is True
        assert by[model, "unfused"].fused_layers == 0
        assert by[model, "fused"].grad_rel_diff < 1e-5
    # The CNN's convolutions and GroupNorms and the sequence model's Linear layers fuse; the MLP's do not.
    assert by["cnn", "fused"].fused_layers == by["cnn", "fused"].fusable_layers - 1  # all but the 2-D head
    assert by["seq", "fused"].fused_layers == by["seq", "fused"].fusable_layers
    assert by["mlp", "fused"].fused_layers == 0
    assert by["mlp", "fused"].grad_bitwise_equal is True
    saved = json.loads((tmp_path / "fusion.json").read_text())
    assert [(r["model"], r["method"]) for r in saved["results"]] == [(r.model, r.method) for r in rows]
    assert saved["meta"]["sizes"]["seq"] == bench.QUICK.seq
    report = (tmp_path / "fusion.md").read_text()
    for model in bench.MODELS:
        assert f"| {model} | fused |" in report
        assert f"| {model} | unfused |" in report
