"""Interpreter tests of the pruning kernels share ONE child process under TRITON_INTERPRET=1: the child imports
visattn once and runs every module's ``run_cases()`` (each test file stays runnable on its own as a script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from interpreted import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ("test_rowscore_kernel_interpret", "test_select_kernel_interpret", "test_recycle_kernel_interpret",
           "test_maxmin_kernel_interpret", "test_row_scores_backends", "test_dpp_kernel_interpret",
           "test_dedup_kernel_interpret")

_CHILD = """
import importlib.util, json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
results = {}
for path in sys.argv[1:]:
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results[name] = module.run_cases()
print(json.dumps(results))
"""


def run_in_one_child(paths: list[str], timeout: float = 900) -> dict:
    """``{module name: run_cases()}`` of every file in ``paths``, from one TRITON_INTERPRET=1 child."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, *paths], env=child_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def interpreted_results() -> dict:
    return run_in_one_child([os.path.join(HERE, f"{name}.py") for name in MODULES])
