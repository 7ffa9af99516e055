"""Smoke test of ``visattn bench-prune --tiny`` (CPU)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_bench_prune_tiny_writes_results(tmp_path):
    from visattn.bench.prune import main

    assert main(["--tiny", "--methods", "fastervlm,fastv", "--batches", "2", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("prune-*-tiny.json")
    result = json.loads(path.read_text())
    assert {"device", "torch", "transformers", "date", "configs"} <= set(result)
    methods = {(r["shape"], r["method"]) for r in result["configs"]}
    assert ("llava-1.5", "fastv") in methods and ("llava-next", "fastervlm") in methods
    pruned = [r for r in result["configs"] if r["method"] != "none"]
    assert all(r["llm_visual_tokens"] == 4 * r["images"] for r in pruned)
