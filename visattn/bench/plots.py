"""PNG plots of benchmark result files (matplotlib, headless): speed-up over dense SDPA and % of floor per problem
for ``bench-attn`` results, img/s per model for ``bench`` results. Device and date are in every title."""

from __future__ import annotations

from pathlib import Path

# dense SDPA peers in order of preference: the speed-up is measured against the fastest dense one present
DENSE_PEERS = ("sdpa_cudnn", "sdpa_flash")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict, what: str) -> str:
    versions = f"torch {result.get('torch', '?')}, triton {result.get('triton', '?')}"
    return f"{what}\n{result.get('device', '?')} · {result.get('date', '?')} · {versions}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def dense_sdpa_ms(row: dict) -> tuple[str, float] | None:
    """(peer name, ms) of the fastest dense SDPA peer measured for this row, or None."""
    found = [(name, _number(row.get("peers", {}).get(name))) for name in DENSE_PEERS]
    found = [(n, t) for n, t in found if t is not None]
    return min(found, key=lambda item: item[1]) if found else None


def plot_attn(result: dict, out_dir: str | Path) -> list[Path]:
    """``speedup_over_sdpa.png`` (every timed implementation vs the fastest dense SDPA, per problem, log scale)
    and ``pct_of_floor.png`` (visattn's time as % of the floor). Returns the paths written."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result.get("rows", []) if _number(r.get("ms"))]
    paths = []

    with_dense = [(r, dense_sdpa_ms(r)) for r in rows]
    with_dense = [(r, d) for r, d in with_dense if d is not None]
    if with_dense:
        series = {"visattn": [d[1] / r["ms"] for r, d in with_dense]}
        others = sorted({n for r, _ in with_dense for n, t in r.get("peers", {}).items()
                         if n not in DENSE_PEERS and _number(t) is not None})  # peers that never ran: no legend
        for name in others:
            series[name] = [(d[1] / t) if (t := _number(r["peers"].get(name))) else float("nan")
                            for r, d in with_dense]
        names = [r["name"] for r, _ in with_dense]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * (len(series) + 1) / 2 + 2), 4.8))
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, values, width, label=label)
            if label == "visattn":
                ax.bar_label(bars, labels=[f"{v:.1f}×" for v in values], fontsize=7, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("speed-up over dense SDPA (×, higher is faster)")
        ax.set_xlabel("problem")
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
        ax.set_title(_title(result, "Speed-up over the fastest dense SDPA (cuDNN / flash), same process"), fontsize=10)
        fig.tight_layout()
        paths.append(out / "speedup_over_sdpa.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    floors = [r for r in rows if _number(r.get("pct_of_floor")) is not None]
    if floors:
        names = [r["name"] for r in floors]
        values = [r["pct_of_floor"] for r in floors]
        fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(names) + 2), 5.2))
        colours = ["tab:blue" if r.get("floor_kind") == "matmul" else "tab:orange" for r in floors]
        bars = ax.bar(range(len(names)), values, color=colours)
        ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], fontsize=7, padding=2)
        ax.set_ylim(0, max(100.0, max(values) * 1.15))
        ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("% of floor (floor time / measured time)")
        ax.set_xlabel("problem (blue: matmul-bound floor, orange: memory-bound floor)")
        ceilings = result.get("ceilings") or {}
        rates = ""
        if ceilings:
            rates = (f"\nfloors from {ceilings.get('matmul_tflops', 0):.0f} TFLOP/s matmul, "
                     f"{ceilings.get('copy_gbs', 0):.0f} GB/s copy, both measured in the same run")
        ax.set_title(_title(result, f"visattn kernel time as % of the floor{rates}"), fontsize=10)
        fig.tight_layout()
        paths.append(out / "pct_of_floor.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def plot_models(result: dict, out_dir: str | Path) -> list[Path]:
    """``models_img_s.png``: inference and train img/s per model (bars labelled with the ratio to the first)."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result.get("rows", []) if "error" not in r]
    phases = [p for p in ("infer", "train") if any(_number(r.get(f"{p}_samples_per_sec")) for r in rows)]
    if not rows or not phases:
        return []
    names = [r["model"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.5, 0.9 * len(names) + 2), 5.2))
    width = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        values = [_number(r.get(f"{phase}_samples_per_sec")) or 0.0 for r in rows]
        xs = [j + (i - (len(phases) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, values, width, label={"infer": "inference", "train": "train step"}[phase])
        ratios = [_number(r.get(f"{phase}_ratio_to_first")) for r in rows]
        ax.bar_label(bars, labels=[f"{x:.2f}×" if x else "" for x in ratios], fontsize=7, padding=2)
    settings = result.get("settings", {})
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images / s (higher is faster)")
    ax.set_xlabel("model (bar labels: ratio to the first model)")
    ax.legend(fontsize=8)
    what = (f"timm models: batch {settings.get('batch_size', '?')}, {settings.get('precision', '?')}"
            f"{', channels-last' if settings.get('channels_last') else ''}"
            f"{', ' + str(settings.get('world_size')) + ' processes' if (settings.get('world_size') or 1) > 1 else ''}")
    ax.set_title(_title(result, what), fontsize=10)
    fig.tight_layout()
    path = out / "models_img_s.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_result(result: dict, out_dir: str | Path) -> list[Path]:
    """The plots that fit a result file's kind (``bench`` key: ``attn`` or ``models``)."""
    kind = result.get("bench")
    if kind == "models":
        return plot_models(result, out_dir)
    if kind == "attn" or any("pct_of_floor" in r for r in result.get("rows", [])):
        return plot_attn(result, out_dir)
    return []


__all__ = ["dense_sdpa_ms", "plot_attn", "plot_models", "plot_result"]
