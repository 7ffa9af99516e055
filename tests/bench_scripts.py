"""Helpers for tests that run a developer script of ``benchmarks/`` in-process and read what it wrote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_strict_json(path: str | Path) -> dict:
    """A result file, failing the test on a non-strict constant (NaN, Infinity)."""
    return json.loads(Path(path).read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
