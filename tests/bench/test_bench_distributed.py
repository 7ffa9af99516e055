"""`torchrun --nproc_per_node 2 -m visattn.cli bench ...` on the CPU: gloo, per-rank inference, a DDP train step,
the one-process baseline and the scaling numbers (the code path the multi-GPU run takes with NCCL)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two processes each building a model, plus the one-process baseline: ~40 s here
def test_torchrun_two_processes_report_per_rank_and_scaling(tmp_path):
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "visattn.cli", "bench", "-m", "test_convnext", "--device", "cpu", "-b", "2", "--img-size", "32",
               "--num-bench-iter", "2", "--results-file", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["world_size"] == 2
    row = data["rows"][0]
    assert row["world_size"] == 2 and "error" not in row
    for phase in ("infer", "train"):
        per_rank = row[f"{phase}_samples_per_sec_per_rank"]
        assert len(per_rank) == 2 and all(v > 0 for v in per_rank)
        assert row[f"{phase}_samples_per_sec"] == pytest.approx(sum(per_rank), rel=1e-3)
        alone = row[f"{phase}_samples_per_sec_1proc"]
        assert alone > 0
        assert row[f"{phase}_scaling_efficiency"] == pytest.approx(sum(per_rank) / (2 * alone), rel=1e-3)
        assert row[f"{phase}_global_batch_size"] == 4
    assert "scaling efficiency" in done.stdout  # the table's per-rank line, printed by rank 0 only
    assert done.stdout.count("wrote ") == 1
