"""Re-run the problems a GPU sweep log marked as failed (after a fix), with visattn.bench.check's own judge.

``--variants`` also replays each failure with one launch choice changed at a time, to isolate a GPU-only wrong
result: the tiled passes' pipeline stages, warps and tile shapes, the small-map backward's warps, block split and
bias-product precision, and the problem in float16, in another layout, at batch 1, without shift and without a bias.
A variant that passes where the problem fails names the choice that matters (the interpreter runs none of these).

Usage (repo root, CUDA): python benchmarks/replay_failures.py CHECK_LOG.json [--variants]
    (exit status 1 while any problem still fails)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from unittest.mock import patch

from visattn.bench.check import run_problem
from visattn.kernels import ops


def _errors(result: dict) -> str:
    found = {name: round(values[0], 4) for name, values in result.get("errors", {}).items()}
    return f"{found} {result.get('error', '')[:120]}"


def _tiles_changed(pass_name: str, change: Callable):
    """``ops._tiles`` with ``change`` applied to one pass's choice."""
    original = ops._tiles

    def tiles(name, *args, **kwargs):
        chosen = original(name, *args, **kwargs)
        return change(chosen) if name == pass_name else chosen

    return tiles


def _cell_record_changed(**changes):
    """``ops._CELL_BWD.record`` with constexprs (and ``warps``) replaced."""
    original = ops._CELL_BWD.record

    def record(grid, n_tensors, scalars, constexprs, warps, stages):
        constexprs = {**constexprs, **{k: v for k, v in changes.items() if k != "warps"}}
        return original(grid, n_tensors, scalars, constexprs, changes.get("warps", warps), stages)

    return record


def variants(problem: dict) -> None:
    """Print the problem's errors under each single change of launch choice or input."""
    def show(tag: str, p: dict) -> None:
        ops._PLANS.clear()
        result = run_problem(p)
        print(f"  {tag:24s} {'ok ' if result.get('ok') else 'BAD'} {_errors(result)}", flush=True)

    inputs = [("float16", {"dtype": "float16"}), ("contiguous", {"layout": "contiguous"}), ("batch 1", {"batch": 1}),
              ("no bias", {"rpb": False})]
    if "shift" in problem:
        inputs.append(("no shift", {"shift": [0] * problem["rank"]}))
    for tag, change in inputs:
        show(tag, {**problem, **change})
    launches = [(f"{pass_name} {tag}", patch.object(ops, "_tiles", _tiles_changed(pass_name, change)))
                for pass_name in ("dq", "dkv", "fwd")
                for tag, change in [("stages 1", lambda t: t._replace(stages=1)),
                                    ("warps 2", lambda t: t._replace(warps=2)),
                                    ("warps 8", lambda t: t._replace(warps=8))]]
    launches += [(tag, patch.object(ops._CELL_BWD, "record", _cell_record_changed(**changes)))
                 for tag, changes in [("cell ieee products", dict(BIAS_PREC="ieee", BINS_PREC="ieee")),
                                      ("cell warps 8", dict(warps=8))]]
    for tag, patched in launches:
        with patched:
            show(tag, problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a `visattn check` JSON log")
    parser.add_argument("--variants", action="store_true", help="also replay each failure with single changes")
    args = parser.parse_args(argv)
    with open(args.log) as fh:
        log = json.load(fh)
    problems = [r for r in (log.get("results") or log.get("problems") or []) if not r.get("ok", True)]
    fixed = 0
    for p in problems:
        problem = {k: v for k, v in p.items() if k not in ("ok", "error", "errors", "kernel_s", "reference_s")}
        res = run_problem(problem)
        fixed += bool(res.get("ok"))
        shown = {k: p.get(k) for k in ("rank", "op", "dtype", "head_dim", "kernel", "window", "lengths")}
        print(res.get("ok"), _errors(res), shown, flush=True)
        if args.variants and not res.get("ok"):
            variants(problem)
    print(f"replayed {len(problems)} failed problems: {fixed} now pass")
    return 0 if fixed == len(problems) else 1


if __name__ == "__main__":
    sys.exit(main())
