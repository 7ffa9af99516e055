"""Run pytest node ids each in its own process, several at a time on one GPU, and print a pass/fail table.

A CUDA fault (illegal address) poisons the whole process, so one bad case fails every later test of a normal
pytest run; here each case runs alone and the table names exactly the cases that fail.

Usage (repo root, CUDA): python benchmarks/isolated_tests.py FILE::TEST --params 0-35 [--workers 8] [--timeout 120]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def run_one(node: str, timeout: float) -> tuple[str, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return node, "TIMEOUT", ""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    status = "pass" if proc.returncode == 0 else "FAIL"
    detail = next((line for line in lines if line.startswith("E ")), lines[-1] if lines else "")
    return node, status, detail[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test", nargs="+", help="FILE::TEST (parametrised by one index)")
    parser.add_argument("--params", default="0-9", help="index range a-b (inclusive)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args(argv)
    lo, hi = (int(x) for x in args.params.split("-"))
    nodes = [f"{test}[{i}]" for test in args.test for i in range(lo, hi + 1)]
    failed = 0
    with ThreadPoolExecutor(args.workers) as pool:
        for node, status, detail in pool.map(lambda n: run_one(n, args.timeout), nodes):
            failed += status != "pass"
            print(f"{status:8s} {node}  {detail if status != 'pass' else ''}", flush=True)
    print(f"{len(nodes) - failed}/{len(nodes)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
