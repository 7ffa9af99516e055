"""Smoke test of ``visattn bench-prune --tiny`` (CPU)."""

from __future__ import annotations

import json

import pytest
from bench_scripts import read_strict_json

pytest.importorskip("transformers")


@pytest.mark.slow
def test_bench_prune_tiny_writes_results(tmp_path):
    from visattn.bench.prune import main

    assert main(["--tiny", "--methods", "fastervlm,fastv", "--batches", "2", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("prune-*-tiny.json")
    result = read_strict_json(path)
    assert {"device", "torch", "transformers", "date", "configs"} <= set(result)
    methods = {(r["shape"], r["method"]) for r in result["configs"]}
    assert ("llava-1.5", "fastv") in methods and ("llava-next", "fastervlm") in methods
    pruned = [r for r in result["configs"] if r["method"] != "none"]
    assert all(r["llm_visual_tokens"] == 4 * r["images"] for r in pruned)


def test_median_rounds_keeps_the_median_round_and_its_baseline():
    """--rounds: one row per config, the round with the median TTFT, speed-up from the baseline's median round."""
    from visattn.bench.prune import _median_rounds

    def row(method, ttft, rnd):
        return dict(shape="llava-1.5", batch=8, method=method, keep_per_image=None if method == "none" else 64,
                    ttft_ms=ttft, round=rnd, llm_prefill_ms=ttft / 2)

    rows = [row("none", 100.0, 0), row("fastv", 50.0, 0), row("none", 120.0, 1), row("fastv", 20.0, 1),
            row("none", 90.0, 2), row("fastv", 40.0, 2)]
    out = {r["method"]: r for r in _median_rounds(rows)}
    assert out["none"]["ttft_ms"] == 100.0 and out["none"]["round"] == 0
    assert out["fastv"]["ttft_ms"] == 40.0 and out["fastv"]["round"] == 2
    assert out["fastv"]["llm_prefill_ms"] == 20.0  # the other columns travel with the chosen round
    assert out["fastv"]["round_ttft_ms"] == [20.0, 40.0, 50.0]
    assert out["fastv"]["ttft_speedup"] == 100.0 / 40.0


def test_results_are_written_as_strict_json():
    """A measurement that did not happen (NaN: no CUDA peak memory, no baseline) is written as null, never NaN."""
    from visattn.bench.prune import strict_json

    row = {"peak_gib": float("nan"), "ttft_speedup": float("inf"), "ttft_ms": 12.5, "rounds": [float("nan"), 1.0]}
    text = json.dumps(strict_json({"configs": [row]}), allow_nan=False)
    assert json.loads(text) == {"configs": [{"peak_gib": None, "ttft_speedup": None, "ttft_ms": 12.5,
                                             "rounds": [None, 1.0]}]}
