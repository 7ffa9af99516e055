"""benchmarks/bench_diffusion.py runs every code path at toy sizes on the CPU and writes strict JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_bench_diffusion_tiny_writes_strict_json(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_diffusion.py"
    spec = importlib.util.spec_from_file_location("bench_diffusion", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "diffusion.json"
    assert bench.main(["--tiny", "--time-budget", "300", "--out", str(out)]) == 0
    text = out.read_text()
    result = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    for key in ("device", "torch", "triton", "diffusers", "date", "ceilings"):
        assert key in result
    ltx2 = result["ltx2"]
    assert ltx2["output_shape"] == [1, 3, 9, 10, 14] and ltx2["stages"] and ltx2["tiled"]["tiled_path_used"]
    assert all("isolated_ms" in stage and stage["floor_ms"] > 0 for stage in ltx2["stages"])
    rows = [row for row in result["blocks"] if "block_ms" in row]
    assert {row["suite"] for row in rows} == {"dit-tiny", "flux-tiny", "hunyuan-tiny"}
    assert not [row for row in result["blocks"] if "error" in row]
    assert all("amdahl_bound" in row for row in rows if row["variant"] != "dense")
