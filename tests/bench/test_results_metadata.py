"""Every result file in benchmarks/results names what produced it: device, torch, triton and date, plus
transformers for the token-pruning (LLaVA) runs and diffusers for the diffusion runs. Old files whose runs did not
record a field carry the string ``"not recorded"``, accepted only for the (file, field) pairs listed below, so a
new result file cannot omit anything and a legacy entry cannot hide a field that is in fact present."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))
NOT_RECORDED = "not recorded"

# (file, field) pairs whose runs did not record the field; nothing in the file or its history proves a value.
LEGACY = {
    ("attn-tune-h100-2026-11-22-run2.json", "torch"),
    ("attn-tune-h100-2026-11-22-run3.json", "torch"),
    ("cpu-backbones-2026-11-30.json", "triton"),
    *((f"prune-h100-2026-11-22{suffix}.json", "triton") for suffix in (
        "", "-run2", "-run2b-targets", "-run3-rounds3", "-run4-rounds5", "-run5-llm-rounds3", "-run6-grid",
        "-run7-rounds5")),
}


def required_fields(name: str) -> list[str]:
    fields = ["device", "torch", "triton", "date"]
    if name.startswith("prune-h"):  # LLaVA prefill through transformers (visattn.bench.prune)
        fields.append("transformers")
    if name.startswith("diffusion-"):
        fields.append("diffusers")
    return fields


def test_there_are_result_files():
    assert len(FILES) >= 40


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_result_file_names_device_versions_and_date(path):
    data = json.loads(path.read_text())
    assert isinstance(data, dict), path.name
    for field in required_fields(path.name):
        value = data.get(field)
        assert isinstance(value, str) and value.strip(), f"{path.name}: '{field}' missing or empty"
        if value == NOT_RECORDED:
            assert (path.name, field) in LEGACY, f"{path.name}: '{field}' is 'not recorded' but not a listed legacy"
        elif (path.name, field) in LEGACY:
            pytest.fail(f"{path.name}: '{field}' is recorded ({value!r}); drop it from LEGACY")
    stamp = re.search(r"(\d{4}-\d{2}-\d{2})", path.name)
    assert stamp and data["date"].startswith(stamp[1]), f"{path.name}: date {data['date']!r} vs the file name"


def test_legacy_entries_name_existing_files():
    names = {p.name for p in FILES}
    assert {name for name, _ in LEGACY} <= names
