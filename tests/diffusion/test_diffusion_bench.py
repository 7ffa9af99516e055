"""benchmarks/bench_diffusion.py runs every code path at toy sizes on the CPU and writes strict JSON."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark, read_strict_json

pytest.importorskip("diffusers")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_bench_diffusion_tiny_writes_strict_json(tmp_path):
    bench = load_benchmark("bench_diffusion")
    out = tmp_path / "diffusion.json"
    assert bench.main(["--tiny", "--time-budget", "300", "--out", str(out)]) == 0
    result = read_strict_json(out)
    for key in ("device", "torch", "triton", "diffusers", "date", "ceilings"):
        assert key in result
    ltx2 = result["ltx2"]
    assert ltx2["output_shape"] == [1, 3, 9, 10, 14] and ltx2["stages"] and ltx2["tiled"]["tiled_path_used"]
    assert all("isolated_ms" in stage and stage["floor_ms"] > 0 for stage in ltx2["stages"])
    rows = [row for row in result["blocks"] if "block_ms" in row]
    assert {row["suite"] for row in rows} == {"dit-tiny", "flux-tiny", "hunyuan-tiny"}
    assert not [row for row in result["blocks"] if "error" in row]
    assert all("amdahl_bound" in row for row in rows if row["variant"] != "dense")
