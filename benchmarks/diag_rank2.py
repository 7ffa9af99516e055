"""Device script: the reduced GPU sweep of tests/kernels/test_engine_gpu.py for one rank, on the small-map path and
then the tiled path, printing each problem's verdict and errors (the test itself only reports the first three).

Usage (repo root, CUDA): PYTHONPATH=$PWD python benchmarks/diag_rank2.py [--rank 2] [--count 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))

from test_engine_gpu import _problems  # noqa: E402

from visattn.bench import check  # noqa: E402
from visattn.kernels import ops  # noqa: E402

KEYS = ("op", "lengths", "kernel", "dilation", "stride", "causal", "window", "shift", "dtype", "rpb", "extra",
        "head_dim", "layout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args(argv)
    for small in (True, False):
        ops.SMALL_MAP = small
        for p in _problems(args.rank, args.count):
            r = check.run_problem(p)
            info = {k: p.get(k) for k in KEYS if p.get(k) is not None}
            errs = r.get("errors") or r.get("error")
            if isinstance(errs, dict):
                errs = {k: f"{v[0]:.1e}" for k, v in errs.items()}
            print("SMALL" if small else "TILED", "ok" if r["ok"] else "FAIL", info, errs, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
