"""Re-run the problems a GPU sweep log marked as failed (after a fix), with visattn.bench.check's own judge.

Usage (repo root, CUDA): python benchmarks/replay_failures.py CHECK_LOG.json   (exit status 1 while any still fails)
"""

from __future__ import annotations

import argparse
import json
import sys

from visattn.bench.check import run_problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a `visattn check` JSON log")
    args = parser.parse_args(argv)
    with open(args.log) as fh:
        log = json.load(fh)
    problems = [r for r in (log.get("results") or log.get("problems") or []) if not r.get("ok", True)]
    fixed = 0
    for p in problems:
        res = run_problem({k: v for k, v in p.items() if k not in ("ok", "error", "errors")})
        fixed += bool(res.get("ok"))
        shown = {k: p.get(k) for k in ("rank", "dtype", "head_dim", "kernel", "lengths")}
        print(res.get("ok"), res.get("error", "")[:120], shown)
    print(f"replayed {len(problems)} failed problems: {fixed} now pass")
    return 0 if fixed == len(problems) else 1


if __name__ == "__main__":
    sys.exit(main())
