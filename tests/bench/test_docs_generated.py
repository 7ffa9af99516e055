"""docs/PERF.md and docs/PRUNE_PERF.md are generated: regenerating them from benchmarks/results with their
hand-written preambles (docs/perf_preamble.md, docs/prune_preamble.md) gives the committed pages byte for byte, so
no number on them can drift from the result files, and `visattn report --prune-out` writes the same page."""

from __future__ import annotations

from pathlib import Path

from visattn import cli
from visattn.bench import report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def test_perf_page_regenerates_byte_identically():
    page = report.render_perf(report.load_results(RESULTS), (ROOT / "docs" / "perf_preamble.md").read_text())
    assert page == (ROOT / "docs" / "PERF.md").read_text(), "run `python -m visattn.cli report`"


def test_prune_page_regenerates_byte_identically():
    page = report.render_prune(report.load_results(RESULTS), (ROOT / "docs" / "prune_preamble.md").read_text())
    assert page == (ROOT / "docs" / "PRUNE_PERF.md").read_text(), "run `python -m visattn.cli report --prune-out ...`"


def test_cli_writes_both_pages_with_their_preambles(tmp_path):
    args = ["report", "--results", str(RESULTS), "--preamble", str(ROOT / "docs" / "perf_preamble.md"),
            "--out", str(tmp_path / "PERF.md"), "--prune-preamble", str(ROOT / "docs" / "prune_preamble.md"),
            "--prune-out", str(tmp_path / "PRUNE_PERF.md")]
    assert cli.main(args) == 0
    assert (tmp_path / "PRUNE_PERF.md").read_text() == (ROOT / "docs" / "PRUNE_PERF.md").read_text()
    assert (tmp_path / "PERF.md").read_text() == (ROOT / "docs" / "PERF.md").read_text()
    prune = (tmp_path / "PRUNE_PERF.md").read_text()
    assert prune.startswith(report.PRUNE_NOTE) and "## Full grid (`prune-h100-2026-11-22-run6-grid.json`)" in prune
