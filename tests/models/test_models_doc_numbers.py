"""The model numbers docs/MODELS.md publishes are backed: every parameter count in its tables is recomputed from the
model (built on the meta device) and must round to the printed value at the printed precision, and every GMACs
figure must be the one of the result file the page names (``backbones-h200-2026-11-30-run2.json``,
``gmacs_224``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch

import visattn  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[2]
MODELS_MD = (ROOT / "docs" / "MODELS.md").read_text()
GMACS_FILE = ROOT / "benchmarks" / "results" / "backbones-h200-2026-11-30-run2.json"
ROW = re.compile(r"^\| `(\w+)` \|(.*)$", re.M)
MILLIONS = re.compile(r"^(\d+(?:\.\d+)?)M$")


def _rows() -> list[tuple[str, list[str]]]:
    return [(name, [c.strip() for c in rest.split("|")]) for name, rest in ROW.findall(MODELS_MD)
            if timm.is_model(name)]


def _param_rows() -> list[tuple[str, str]]:
    out = {}
    for name, cells in _rows():
        first = next((c for c in cells if MILLIONS.match(c)), None)  # ours comes before the paper's
        if first is not None:
            out.setdefault(name, first)
    return sorted(out.items())


def test_the_tables_were_found():
    names = [name for name, _ in _param_rows()]
    assert len(names) >= 20 and "nat_tiny" in names and "agent_deit_b" in names and "biformer_base" in names


@pytest.mark.parametrize("name,printed", _param_rows())
def test_parameter_count_matches_the_model(name, printed):
    with torch.device("meta"):
        model = timm.create_model(name)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    decimals = len(printed[:-1].split(".")[1]) if "." in printed else 0
    assert f"{millions:.{decimals}f}M" == printed, (name, millions)


def test_gmacs_are_the_result_files():
    gmacs = json.loads(GMACS_FILE.read_text())["gmacs_224"]
    assert GMACS_FILE.name in MODELS_MD
    checked = 0
    for name, cells in _rows():
        if len(cells) >= 4 and MILLIONS.match(cells[0]) and MILLIONS.match(cells[1]):  # name | ours | paper | GMACs
            assert cells[2] == f"{gmacs[name]:.2f}", (name, cells[2], gmacs[name])
            checked += 1
    assert checked >= 13
