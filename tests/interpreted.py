"""Run a test module as a child process under TRITON_INTERPRET=1 and read the JSON its last stdout line holds.

Triton picks interpreter or compiler when a kernel module is imported, so interpreter cases cannot share the
pytest process (whose kernels are compiled, or absent without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(path: str, timeout: float) -> object:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
