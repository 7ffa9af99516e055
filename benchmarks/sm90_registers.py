"""Registers, spills and shared memory of the tiled engine's kernels on sm90, compiled on a machine without a GPU.

The engine's launches are recorded on CPU tensors (``launch.KernelLauncher`` is swapped for a recorder while the
plans are made with ``TRITON_INTERPRET`` unset, so the GPU tile volumes are chosen), then each recorded kernel is
compiled by the installed Triton for an ``sm_90a`` target and its PTX assembled by Triton's bundled ``ptxas -v``.
What ``ptxas`` reports (registers per thread, spill stores / loads in bytes) and Triton's shared-memory size are
what decide occupancy and local-memory traffic on an H100 / H200, so volumes and kernel changes can be screened
here before device time is spent. The installed Triton's code generation is what is measured: compile with the
device image's Triton (3.6 on ours; ``PYTHONPATH`` a side install first) to match it. No timing: a count.

Descriptor (TMA) loads are chosen by compute capability, which CPU tensors lack; ``--descriptors`` forces them on
for the passes that take them on Hopper (head_dim > 32, no dilation), as the H100 runs them.

``--sass`` adds each kernel's main-loop instruction mix (``cuobjdump -sass``, static); ``VISATTN_DKV_STATS`` picks
the dK/dV pass's LSE / delta reads as in a run.

Usage (repo root, CPU): python benchmarks/sm90_registers.py --stage flux4k_na_k80 [--descriptors] [--sass]
    [--pass dkv --volume 64,64,4,2 --volume 32,128,8,2] [--out F.json]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the GPU tile volumes, not the interpreter's (read when visattn is imported)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from visattn.bench import common  # noqa: E402
from visattn.kernels import launch, ops, tiles  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)
PASS_KERNELS = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkv": "_bwd_dkv_kernel"}
PASS_KEYS = {"fwd": "fwd", "dq": "bwd", "dkv": "dkv"}


class _OfflineDriver:
    """The few driver calls Triton's JIT makes before compiling, answered for an sm90 target without a GPU."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class _Recorder:
    """Stands in for ``KernelLauncher.__call__``: keeps (kernel, record, tensors) instead of launching."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __call__(self, launcher, rec, tensors):
        self.launches.append((launcher.kernel, rec, tuple(tensors)))


def ptxas_report(ptx: str) -> dict:
    """``ptxas -v`` for sm_90a on one kernel's PTX: registers per thread and spill bytes."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    return parse_ptxas(done.stderr + done.stdout)


def parse_ptxas(text: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` output (the last function reported), and whether ptxas
    serialized the function's wgmma instructions (its performance advisory C7515)."""
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs:
        raise ValueError(f"no register count in ptxas output: {text[:200]!r}")
    stores, loads = spills[-1] if spills else ("0", "0")
    # C7515: ptxas waits on every wgmma of the function (no overlap of tensor-core work with anything else)
    return {"registers": int(regs[-1]), "spill_store_bytes": int(stores), "spill_load_bytes": int(loads),
            "wgmma_serialized": "C7515" in text}


def loop_profile(cubin: bytes) -> dict:
    """The static instruction mix of a kernel's longest loop (the span of its longest backward branch) in the SASS
    of ``cubin`` (``cuobjdump -sass``): instruction count and the most frequent opcodes. A static count: a loop
    with two mask branches counts both."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    return parse_loop(sass)


def parse_loop(sass: str) -> dict:
    """``loop_profile`` on SASS text: lines ``/*addr*/ [@pred] OPCODE.modifiers operands ;``."""
    instrs = [(int(m[1], 16), m[2].strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = [(int(m[1], 16), addr) for addr, ins in instrs for m in [re.search(r"BRA\b.*0x([0-9a-f]+)", ins)]
             if m and int(m[1], 16) < addr]
    if not spans:
        return {"loop_instructions": 0, "loop_opcodes": {}}
    lo, hi = max(spans, key=lambda span: span[1] - span[0])
    opcodes: dict[str, int] = {}
    for addr, ins in instrs:
        if lo <= addr <= hi:
            op = re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]
            opcodes[op] = opcodes.get(op, 0) + 1
    top = dict(sorted(opcodes.items(), key=lambda kv: -kv[1])[:12])
    return {"loop_instructions": sum(opcodes.values()), "loop_opcodes": top}


def record_launches(stage: str, descriptors: bool) -> list[tuple]:
    """The engine's launches of one forward+backward of ``stage`` (``tune_tiles.STAGES``, no bias), recorded."""
    from tune_tiles import STAGES

    if launch.INTERPRETED:
        raise RuntimeError("sm90_registers: visattn was imported under TRITON_INTERPRET=1 (interpreter tile volumes)")
    spatial, heads, dim, batch, kernel, stride, _, _ = STAGES[stage]
    rank = len(spatial)
    kernel = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    pat = ops.make_pattern(rank, False, kernel, (1,) * rank, (stride,) * rank, (False,) * rank, (0,) * rank)
    q, k, v = (torch.randn((batch, *spatial, heads, dim), dtype=torch.bfloat16) for _ in range(3))
    recorder = _Recorder()
    saved_call, saved_why = launch.KernelLauncher.__call__, ops.kv_descriptor_why_not
    launch.KernelLauncher.__call__ = lambda self, rec, tensors: recorder(self, rec, tensors)
    if descriptors:
        ops.kv_descriptor_why_not = lambda t3, pat: None
    try:
        ops._PLANS.clear()
        out, lse = ops.forward(q, k, v, None, None, None, pat, dim ** -0.5)
        ops.backward(torch.randn_like(out), q, k, v, out, lse, None, None, None, pat, dim ** -0.5)
    finally:
        launch.KernelLauncher.__call__, ops.kv_descriptor_why_not = saved_call, saved_why
        ops._PLANS.clear()
    return recorder.launches


def compile_sm90(kernel, rec, tensors, sass: bool = False) -> dict:
    """Compile one recorded launch for sm90; its ptxas report, shared memory and launch options (and with ``sass``
    its main loop's static instruction mix, ``loop_profile``)."""
    compiled = kernel.warmup(*tensors, *rec.scalars, **rec.constexprs, **rec.options, grid=rec.grid)
    report = ptxas_report(compiled.asm["ptx"])
    if sass:
        report.update(loop_profile(compiled.asm["cubin"]))
    tile = {name: rec.constexprs[name] for name in ("M0", "M1", "M2", "N0", "N1", "N2") if name in rec.constexprs}
    return {"kernel": kernel.__name__, **report, "shared_bytes": int(compiled.metadata.shared),
            "num_warps": rec.options["num_warps"], "num_stages": rec.options["num_stages"], "boxes": tile,
            "descriptors": bool(rec.constexprs.get("KV_DESC") or rec.constexprs.get("QDO_DESC"))}


def volume_entry(pass_name: str, stage: str) -> tuple:
    """The ``tiles._VOLUMES`` key a pass of ``stage`` reads (16-bit inputs, no window); the dK/dV pass's own key
    even where the table has no entry for it yet (``tiles.volume_key`` then names the dQ pass's)."""
    from tune_tiles import STAGES

    spatial, _, dim, _, kernel, _, _, _ = STAGES[stage]
    rank = len(spatial)
    kernel3 = (1,) * (3 - rank) + (kernel if isinstance(kernel, tuple) else (kernel,) * rank)
    key = tiles.volume_key(pass_name, False, kernel3, 16, dim)
    return (PASS_KEYS[pass_name], *key[1:])


def main(argv: list[str] | None = None) -> int:
    from tune_tiles import STAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=sorted(STAGES))
    parser.add_argument("--pass", dest="pass_name", choices=sorted(PASS_KERNELS), default=None,
                        help="only this pass; with --volume, the pass whose volume varies (every pass is "
                             "reported once at the shipped volumes first)")
    parser.add_argument("--volume", action="append", default=[],
                        help="BLOCK_M,BLOCK_N,warps,stages for --pass (repeatable; default: the shipped table)")
    parser.add_argument("--descriptors", action="store_true", help="TMA descriptor loads, as on Hopper")
    parser.add_argument("--sass", action="store_true", help="also the main loop's static instruction mix")
    parser.add_argument("--dkv-stats", default=None,
                        help="comma list of ops.DKV_STATS settings to compile in turn (default: the current one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.volume and not args.pass_name:
        parser.error("--volume needs --pass")
    driver.set_active(_OfflineDriver())
    saved = tiles.volume_tables()
    rows = []
    settings = args.dkv_stats.split(",") if args.dkv_stats else [ops.DKV_STATS]
    if any(setting not in ops._DKV_STATS_MODES for setting in settings):
        parser.error(f"--dkv-stats {args.dkv_stats!r}: choose from {', '.join(ops._DKV_STATS_MODES)}")
    # per setting: the shipped tables first (every pass, or --pass alone without --volume), then each --volume
    for setting, volume in [(setting, v) for setting in settings for v in [None, *args.volume]]:
        ops.DKV_STATS = setting
        if volume is not None:
            tiles.set_volume(volume_entry(args.pass_name, args.stage), tuple(int(x) for x in volume.split(",")))
        try:
            for kernel, rec, tensors in record_launches(args.stage, args.descriptors):
                varied = volume is not None or not args.volume
                if args.pass_name and varied and kernel.__name__ != PASS_KERNELS[args.pass_name]:
                    continue
                row = {"volume": volume, "dkv_stats": ops.DKV_STATS, **compile_sm90(kernel, rec, tensors, args.sass)}
                rows.append(row)
                print(row, flush=True)
        finally:
            tiles.restore_volume_tables(saved)
    if args.out:
        header = {**common.environment(), "device": "none: offline compile for sm_90a (ptxas -v)",
                  "triton": triton.__version__}
        common.write_json(args.out, {"bench": "sm90-registers", **header, "target": "sm_90a", "stage": args.stage,
                                     "descriptors": args.descriptors, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
