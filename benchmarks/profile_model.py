"""Where a timm model's forward spends its GPU time (torch.profiler), and which attention backends it chose.

Usage (repo root, CUDA): python benchmarks/profile_model.py [MODEL] [BATCH] [--dtype fp16|bf16]
MODEL may carry ``@visattn`` (timm's Swin on visattn windows), as in ``visattn bench``. Prints tables only.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from visattn import functional
from visattn.bench.common import DTYPES, parse_dtype
from visattn.bench.models import ModelSpec, Settings, create_model, parse_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="nat_tiny", help="timm model name (name@visattn allowed)")
    parser.add_argument("batch", nargs="?", type=int, default=256)
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    args = parser.parse_args(argv)
    dtype = parse_dtype(args.dtype, "--dtype")
    spec: ModelSpec = parse_spec(args.model)
    settings = Settings(device="cuda", batch_size=args.batch, num_warm_iter=3, num_bench_iter=1, amp_dtype=None,
                        model_dtype=dtype, precision=str(dtype))
    model, input_size = create_model(spec, settings)
    x = torch.randn(args.batch, *input_size, device="cuda", dtype=dtype)
    seen = set()
    original = functional._choose

    def spy(op, backend, query, *rest, **kwargs):  # records (op, chosen backend, shape, dtype) per call site
        chosen = original(op, backend, query, *rest, **kwargs)
        seen.add((op, chosen, tuple(query.shape), str(query.dtype)))
        return chosen

    functional._choose = spy
    try:
        with torch.no_grad():
            for _ in range(3):
                model.eval()(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                model(x)
                torch.cuda.synchronize()
    finally:
        functional._choose = original
    for item in sorted(seen):
        print(item)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
