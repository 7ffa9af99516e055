"""The ``visattn`` command: info, smoke, check, bench, bench-attn, bench-prune."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Optional


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # report, never crash: info is for diagnosing broken installs
        return f"not available ({type(err).__name__})"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import visattn
    from visattn.functional import available_backends

    print(f"visattn       {visattn.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    for name in ("torch", "triton", "timm", "open_clip", "transformers", "natten"):
        print(f"{name:13s} {_version(name)}")
    cuda = torch.cuda.is_available()
    print(f"CUDA          {torch.version.cuda or 'none'} (available: {cuda})")
    device = "cuda" if cuda else "cpu"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"device        {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("device        cpu")
    print(f"\nbackends on {device} (why not, where one cannot run):")
    for op, backends in available_backends(device).items():
        for backend, why_not in backends.items():
            print(f"  {op:16s} {backend:10s} {'ok' if why_not is None else 'no: ' + why_not}")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from visattn.bench.smoke import format_table, run_smoke

    rows = run_smoke(args.device, args.dtype, models=not args.no_models)
    print(format_table(rows))
    failed = [r.op for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# Sub-commands implemented by ``module.main(argv)`` with their own parsers, imported only when used.
DELEGATED = {
    "bench": ("visattn.bench.models", "images/sec of timm models: visattn's attention vs the stock path"),
    "check": ("visattn.bench.check", "GPU correctness sweep of the Triton kernels against the reference"),
    "bench-attn": ("visattn.bench.attn", "kernel benchmarks: time, TFLOP/s, floor, peers"),
    "bench-bra": ("visattn.bench.bra", "bi-level routing: fused kernel vs BiFormer's gather, time and memory"),
    "bench-prune": ("visattn.bench.prune", "token-pruning benchmarks on LLaVA-shaped models"),
    "bench-prune-kernels": ("visattn.bench.prune_kernels", "LLM-stage pruning kernels (row scores, top-k) vs eager"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends can run here (and why not)").set_defaults(
        func=cmd_info
    )
    smoke = sub.add_parser("smoke", help="run every attention op on a real photo against the dense oracle")
    smoke.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    smoke.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    smoke.add_argument("--no-models", action="store_true", help="attention ops only (skip the timm model rows)")
    smoke.set_defaults(func=cmd_smoke)
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see `visattn {name} --help`)", add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
