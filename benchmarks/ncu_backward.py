"""Nsight Compute view of the tiled engine's passes at one diffusion or vision shape: what bounds each kernel.

Two modes. ``--workload STAGE``: one warm-up forward+backward, then one more between ``cudaProfilerStart`` and
``cudaProfilerStop`` (run it under ``ncu --profile-from-start off``). ``--parse CSV --out JSON``: turn the
``ncu --import REP --page details --csv`` export into a result file, one entry per kernel with its
duration, issue-slot and pipe utilisation, occupancy and limits, registers, shared memory, local-memory (spill)
traffic and the warp-stall breakdown. Stages are ``tune_tiles.STAGES`` (without a bias).

Usage (repo root, CUDA):
  ncu --profile-from-start off --section SpeedOfLight,Occupancy,LaunchStats,WarpStateStats,ComputeWorkloadAnalysis,
      MemoryWorkloadAnalysis -o /tmp/p python benchmarks/ncu_backward.py --workload flux4k_na_k80
  ncu --import /tmp/p.ncu-rep --page details --csv > /tmp/p.csv
  ncu --import /tmp/p.ncu-rep --page raw --csv > /tmp/raw.csv
  python benchmarks/ncu_backward.py --parse /tmp/p.csv --raw /tmp/raw.csv --stage flux4k_na_k80 --out F.json
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from visattn.bench import common  # noqa: E402

# ncu metric names (details page) kept per kernel, under short keys
METRICS = {
    "Duration": "duration",
    "Compute (SM) Throughput": "sm_throughput_pct",
    "Memory Throughput": "memory_throughput_pct",
    "Issue Slots Busy": "issue_slots_busy_pct",
    "Executed Ipc Active": "executed_ipc_active",
    "Registers Per Thread": "registers_per_thread",
    "Dynamic Shared Memory Per Block": "dynamic_shared_per_block",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Block Limit Registers": "block_limit_registers",
    "Block Limit Shared Mem": "block_limit_shared_mem",
    "Warp Cycles Per Issued Instruction": "warp_cycles_per_issued_instruction",
    "Local Memory Spilling Requests": "local_spill_requests",
    "Local Memory Spilling Request Overhead": "local_spill_overhead_pct",
    "Threads": "threads",
    "Grid Size": "grid_size",
    "Block Size": "block_size",
}


def workload(stage: str) -> None:
    """One warm-up forward+backward of ``stage``, then one profiled."""
    from tune_tiles import stage_step

    step = stage_step(stage)
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse(csv_path: str) -> list[dict]:
    """Per-kernel metrics from an ncu details CSV (rows: ID, kernel name, section, metric, unit, value)."""
    kernels: dict[str, dict] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("==")):
            key = f"{row['ID']}:{row['Kernel Name'].split('(')[0]}"
            entry = kernels.setdefault(key, {"kernel": row["Kernel Name"].split("(")[0], "stalls": {}})
            name, unit, value = row["Metric Name"], row.get("Metric Unit", ""), _number(row["Metric Value"])
            if name == "Memory Throughput" and unit != "%":  # the memory section's, in bytes per second
                entry["memory_throughput_bytes_per_s"] = value
                entry["memory_throughput_bytes_per_s_unit"] = unit
            elif name in METRICS:
                entry[METRICS[name]] = value
                if unit:
                    entry[METRICS[name] + "_unit"] = unit
            elif row["Section Name"] == "Warp State Statistics" and name.startswith("Stall"):
                entry["stalls"][name] = value
    return list(kernels.values())


def parse_raw_stalls(csv_path: str) -> list[dict]:
    """Per-kernel warp-stall ratios (cycles per issued instruction by reason) from an ncu raw-page CSV export
    (header row, units row, one row per kernel)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(line for line in f if not line.startswith("==")))
    header, data = rows[0], rows[2:]
    keep = [i for i, name in enumerate(header) if "issue_stalled" in name and name.endswith(".ratio")]
    name_col = header.index("Kernel Name")
    return [{"kernel": row[name_col].split("(")[0],
             "stalls": {header[i].split("issue_stalled_")[1].split("_per_")[0]: _number(row[i]) for i in keep}}
            for row in data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default=None, help="stage to run (under ncu)")
    parser.add_argument("--parse", default=None, help="ncu details CSV to convert")
    parser.add_argument("--raw", default=None, help="ncu raw-page CSV of the same report (warp stalls), with --parse")
    parser.add_argument("--stage", default=None, help="stage name recorded with --parse")
    parser.add_argument("--note", default="", help="free text recorded with --parse (tree, volumes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.workload:
        missing = common.require_cuda("ncu_backward")
        if missing:
            print(missing, file=sys.stderr)
            return 2
        workload(args.workload)
        return 0
    if args.parse:
        kernels = parse(args.parse)
        if args.raw:
            for entry, raw in zip(kernels, parse_raw_stalls(args.raw), strict=False):
                entry["stall_cycles_per_issue"] = raw["stalls"]
        common.save_result("ncu-backward", {"stage": args.stage, "note": args.note, "kernels": kernels}, args.out)
        return 0
    parser.error("give --workload or --parse")
    return 2


if __name__ == "__main__":
    sys.exit(main())
