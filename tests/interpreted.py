"""Run a test module as a child process under TRITON_INTERPRET=1 and read the JSON its last stdout line holds.

Triton picks interpreter or compiler when a kernel module is imported, so interpreter cases cannot share the
pytest process (whose kernels are compiled, or absent without a GPU)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


# Inductor's on-disk caches private to this test session (unless the caller chose a directory): a graph compiled
# and cached by another checkout on this machine (same graph, another op schema) must not be replayed here.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="visattn-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


def child_env(**extra: str) -> dict:
    """The environment of a child process: the repository's visattn and the shared test helpers importable
    (visattn need not be installed), the test session's Inductor cache, plus ``extra``."""
    paths = [REPO, TESTS, os.path.join(TESTS, "tokenprune"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)


def run_interpreted(path: str, timeout: float) -> object:
    proc = subprocess.run([sys.executable, path], env=child_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case_interpreted(test_file: str, timeout: float = 600) -> object:
    """Import the test module at ``test_file`` in a child process under TRITON_INTERPRET=1, call its
    ``run_case()`` and return the JSON-decoded result."""
    folder, module = os.path.split(os.path.splitext(os.path.abspath(test_file))[0])
    code = (f"import sys, json; sys.path.insert(0, {folder!r}); import {module} as t; "
            "print(json.dumps(t.run_case()))")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

