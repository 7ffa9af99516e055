"""Re-run the problems a GPU sweep log marked as failed (after a fix), with visattn.bench.check's own judge."""

import json
import sys

from visattn.bench.check import run_problem

log = json.load(open(sys.argv[1]))
problems = [r for r in (log.get("results") or log.get("problems") or []) if not r.get("ok", True)]
fixed = 0
for p in problems:
    res = run_problem({k: v for k, v in p.items() if k not in ("ok", "error", "errors")})
    fixed += bool(res.get("ok"))
    print(res.get("ok"), res.get("error", "")[:120], {k: p[k] for k in ("rank", "dtype", "head_dim", "kernel", "lengths")})
print(f"replayed {len(problems)} failed problems: {fixed} now pass")
