"""The ``visattn`` command: one table of sub-commands, each a module with ``add_arguments(parser)`` and ``run(args)``.

A command's module is imported only when that command runs (``visattn info`` never imports the benchmarks).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A row of the command table: the module that implements it (``add_arguments`` + ``run``) and its help."""

    name: str
    module: str
    help: str


COMMANDS = (
    Command("info", "visattn.cli", "versions, device, and which backends and kernels can run here (and why not)"),
    Command("smoke", "visattn.cli", "run every attention op on a real photo against the dense oracle"),
    Command("check", "visattn.bench.check", "GPU correctness sweep of the Triton kernels against the reference"),
    Command("bench", "visattn.bench.models",
            "images/sec of any timm model, inference and train step, with timm benchmark.py's flags"),
    Command("bench-attn", "visattn.bench.attn", "kernel benchmarks from a YAML suite: time, TFLOP/s, floor, peers"),
    Command("bench-bra", "visattn.bench.bra", "bi-level routing: fused kernel vs BiFormer's gather, time and memory"),
    Command("bench-agent", "visattn.bench.agent", "agent attention: fused kernels vs two SDPA calls vs official eager"),
    Command("bench-prune", "visattn.bench.prune", "token-pruning benchmarks on LLaVA-shaped models"),
    Command("bench-prune-kernels", "visattn.bench.prune_kernels",
            "LLM-stage pruning kernels (row scores, top-k, recycling) vs eager"),
    Command("report", "visattn.bench.report", "regenerate docs/PERF.md (and PRUNE_PERF.md) from result files"),
)
_BY_NAME = {c.name: c for c in COMMANDS}


# ----------------------------------------------------------------------------------------------- info
def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # report, never crash: info is for diagnosing broken installs
        return f"not available ({type(err).__name__})"


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="report for this device (default: cuda when available)")


def _info(args: argparse.Namespace) -> int:
    import torch

    import visattn
    from visattn import backends

    print(f"visattn       {visattn.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    for name in ("torch", "triton", "timm", "open_clip", "transformers", "diffusers", "natten"):
        print(f"{name:13s} {_version(name)}")
    cuda = torch.cuda.is_available()
    print(f"CUDA          {torch.version.cuda or 'none'} (available: {cuda})")
    device = args.device or ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and cuda:
        props = torch.cuda.get_device_properties(torch.device(device))
        print(f"device        {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    else:
        print(f"device        {device}")
    print(f"default backend: {backends.get_backend()} "
          f"(attention: {backends.get_backend('attention')}, tokenprune: {backends.get_backend('tokenprune')})")
    functional = importlib.import_module("visattn.functional")
    if hasattr(functional, "available_backends"):
        print(f"\nbackends per op on {device} (why not, where one cannot run):")
        for op, choices in functional.available_backends(device).items():
            for backend, why_not in choices.items():
                print(f"  {op:16s} {backend:10s} {'ok' if why_not is None else 'no: ' + why_not}")
    if hasattr(functional, "which_path"):
        _info_engine_paths(functional, torch, device)
    importlib.import_module("visattn.tokenprune.kernels")  # registers the pruning kernels with the policy
    kernels = backends.list_kernels(device)
    print(f"\nfused kernels on {device}, by family (why not, where one cannot run):")
    if not kernels:
        print("  (none registered)")
    for family in backends.FAMILIES:
        entries = [(entry, why) for entry, why in kernels if entry.family == family]
        if entries:
            print(f"  {family}:")
        for entry, why in entries:
            status = "ok" if why is None else "no: " + why
            print(f"    {entry.name:24s} {status}" + (f"  ({entry.description})" if entry.description else ""))
    return 0


# stage shapes of visattn's backbones (map, heads, call): which engine path each one takes on this device
_PATH_EXAMPLES = [
    ("NAT-T stage 1 (56x56, k7, rpb)", (56, 56), 2, dict(op="na2d", kernel_size=7)),
    ("NAT-T stage 3 (14x14, k7, rpb)", (14, 14), 8, dict(op="na2d", kernel_size=7)),
    ("NAT-T stage 4 (7x7, k7, rpb)", (7, 7), 16, dict(op="na2d", kernel_size=7)),
    ("DiNAT-T stage 1 (56x56, k7, d8, rpb)", (56, 56), 2, dict(op="na2d", kernel_size=7, dilation=8)),
    ("Swin-T stage 1 (56x56, w7, shift 3, rpb)", (56, 56), 3, dict(op="window_attention", window_size=7, shift=3)),
]


def _info_engine_paths(functional, torch, device: str) -> None:
    print(f"\nengine path per call on {device} (bf16, head_dim 32; functional.which_path):")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for label, spatial, heads, call in _PATH_EXAMPLES:
        call = dict(call)
        op = call.pop("op")
        try:
            q = torch.empty(1, *spatial, heads, 32, device=device, dtype=dtype)
            rpb = torch.empty(heads, 13, 13, device=device, dtype=dtype)
            path, why = functional.which_path(op, q, q, q, rpb=rpb, **call)
        except Exception as err:  # report, never crash
            path, why = "error", f"{type(err).__name__}: {err}"
        print(f"  {label:42s} {path:18s} {why}")


# ----------------------------------------------------------------------------------------------- smoke
def _smoke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    from visattn.bench.common import short_dtype

    parser.add_argument("--dtype", "--precision", dest="dtype", default="auto", type=short_dtype,
                        choices=["auto", "fp32", "fp16", "bf16"],
                        help="data type (default auto: fp16 on CUDA, fp32 on the CPU; float32 / float16 / bfloat16 "
                             "are accepted too)")
    parser.add_argument("--no-models", action="store_true", help="attention ops only (skip the timm model rows)")


def _smoke(args: argparse.Namespace) -> int:
    from visattn.bench.smoke import format_table, run_smoke

    rows = run_smoke(args.device, args.dtype, models=not args.no_models)
    print(format_table(rows))
    failed = [r.op for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


_LOCAL = {"info": (_info_arguments, _info), "smoke": (_smoke_arguments, _smoke)}


# ----------------------------------------------------------------------------------------------- the table
def _description(command: Command) -> str:
    """What ``visattn COMMAND --help`` shows above the flags: the module's user-facing ``DESCRIPTION`` where it
    has one (never its docstring, which is written for developers), else the command's one-line help."""
    if command.name in _LOCAL:
        return command.help
    return getattr(importlib.import_module(command.module), "DESCRIPTION", command.help)


def _implementation(command: Command):
    """(add_arguments, run) of a command, or (None, main) for a module that only has ``main(argv)`` so far."""
    if command.name in _LOCAL:
        return _LOCAL[command.name]
    module = importlib.import_module(command.module)
    if hasattr(module, "add_arguments") and hasattr(module, "run"):
        return module.add_arguments, module.run
    return None, module.main  # thin wrapper: the module parses its own argv (bench-prune*, until they move over)


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The ``visattn`` parser. Only command ``load`` gets its real arguments (importing its module); the rest are
    listed with their help, so ``visattn --help`` stays fast."""
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        if command.name != load:
            sub.add_parser(command.name, help=command.help, add_help=False)
            continue
        add_arguments, run = _implementation(command)
        child = sub.add_parser(command.name, help=command.help, description=_description(command),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        if add_arguments is not None:
            add_arguments(child)
        child.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else None
    command = _BY_NAME.get(name)
    if command is not None:
        add_arguments, run = _implementation(command)
        if add_arguments is None:  # a main(argv) module: hand it the rest of the line untouched
            return int(run(argv[1:]) or 0)
    args = build_parser(load=name if command else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
