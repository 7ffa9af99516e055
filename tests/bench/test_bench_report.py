"""`visattn report` regenerates the performance page from result files (keeping the hand-written preamble), and
`--plot` writes real PNGs; both from the fixture results in tests/bench/fixtures."""

import json
import shutil
from pathlib import Path

from visattn import cli
from visattn.bench import plots, report

FIXTURES = Path(__file__).parent / "fixtures"


def _results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(FIXTURES / "attn-fixture-run4.json", folder / "attn-h100-2026-11-22-run4.json")
    shutil.copy(FIXTURES / "models-fixture.json", folder / "models-h100-2026-11-22-run3.json")
    # an older run of one problem with a different time: the page must show the later run's number
    older = json.loads((FIXTURES / "attn-fixture-run4.json").read_text())
    older["rows"] = [dict(older["rows"][0], ms=9.999)]
    (folder / "attn-h100-2026-11-22-run2.json").write_text(json.dumps(older))
    (folder / "broken.json").write_text("{not json")
    return folder


def test_report_regenerates_the_page_from_results(tmp_path, capsys):
    folder = _results(tmp_path)
    preamble = tmp_path / "preamble.md"
    preamble.write_text("# Performance\n\nHand-written words that must survive regeneration.\n")
    out = tmp_path / "PERF.md"
    assert cli.main(["report", "--results", str(folder), "--preamble", str(preamble), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith(report.GENERATED_NOTE)
    assert "Hand-written words that must survive regeneration." in page
    attn_rows = json.loads((FIXTURES / "attn-fixture-run4.json").read_text())["rows"]
    first = attn_rows[0]
    line = next(line for line in page.splitlines() if line.startswith(f"| {first['name']} |"))
    assert f"{first['ms']:.3g}" in line and "9.999" not in page  # run 4 wins over run 2
    assert "attn-h100-2026-11-22-run4.json" in line
    for row in attn_rows:
        assert f"| {row['name']} |" in page
    models_rows = json.loads((FIXTURES / "models-fixture.json").read_text())["rows"]
    for row in models_rows:
        assert f"| {row['model']} |" in page
    assert "error: infer: OutOfMemoryError" in page
    assert "| 11092 |" in page  # swin on visattn, img/s as recorded
    assert "broken.json" in capsys.readouterr().err  # an unreadable file is named, not silently dropped


def test_result_files_are_ordered_by_date_then_run(tmp_path):
    folder = _results(tmp_path)
    names = [path.name for path, _, _ in report.load_results(folder)]
    assert names.index("attn-h100-2026-11-22-run2.json") < names.index("attn-h100-2026-11-22-run4.json")
    kinds = {path.name: kind for path, kind, _ in report.load_results(folder)}
    assert kinds["models-h100-2026-11-22-run3.json"] == "models" and kinds["attn-h100-2026-11-22-run4.json"] == "attn"


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plots_from_fixture_results(tmp_path):
    attn_result = json.loads((FIXTURES / "attn-fixture-run4.json").read_text())
    written = plots.plot_result(attn_result, tmp_path)
    assert [p.name for p in written] == ["speedup_over_sdpa.png", "pct_of_floor.png"]
    assert all(_is_png(p) for p in written)
    models_result = json.loads((FIXTURES / "models-fixture.json").read_text())
    written = plots.plot_result(models_result, tmp_path)
    assert [p.name for p in written] == ["models_img_s.png"] and _is_png(written[0])
    row = attn_result["rows"][0]
    name, ms = plots.dense_sdpa_ms(row)
    assert ms == min(row["peers"]["sdpa_cudnn"], row["peers"]["sdpa_flash"]) and name.startswith("sdpa_")


def test_engine_backbones_and_diffusion_sections_from_the_h200_files():
    """The device-script sections render from the committed result files, with the ratios their rows imply."""
    import json
    from pathlib import Path

    from visattn.bench import report

    results = report.load_results(Path(__file__).resolve().parents[2] / "benchmarks" / "results")
    engine = report.engine_section(results)
    # per stage, the newest engine-profile file that measured it, found independently of the report's own picker
    files = sorted((Path(__file__).resolve().parents[2] / "benchmarks/results").glob("engine-*.json"))
    loaded = [json.loads(f.read_text()) | {"_name": f.name} for f in files]
    loaded = [d for d in loaded if d.get("bench") == "engine-profile"]

    def order(d):
        return d["date"], "-run" in d["_name"] and int(d["_name"].split("-run")[1][0]), d["_name"]

    def newest_with(stage):
        return max((d for d in loaded if any(r.get("stage") == stage for r in d.get("rows", []))), key=order)

    for stage in ("nat_s1", "swin_s4"):  # swin_s4 is absent from the newest files (they measured NAT-T only)
        newest = newest_with(stage)
        ours = next(r for r in newest["rows"] if r["stage"] == stage and r.get("rpb") is False and "dense" not in r)
        dense = next(r for r in newest["rows"] if r["stage"] == stage and r.get("dense") == "cudnn")
        row = next(line for line in engine.splitlines() if line.startswith(f"| {stage} | no |"))
        cells = [c.strip() for c in row.strip(" |").split("|")]
        assert cells[-1] == newest["_name"] and cells[-2] == report._cell(dense["fwd_bwd_ms"] / ours["fwd_bwd_ms"]), row
    backbones = report.backbones_section(results)
    assert "official-style gather BRA" in backbones and "| biformer_tiny |" in backbones
    diffusion = report.diffusion_section(results)
    assert "121 frames at 512×768" in diffusion and diffusion.count("\n| ") >= 5


def test_timm_inplace_and_video_sparse_sections_show_the_newest_rows():
    older = {"bench": "timm-inplace", "device": "GPU X", "rows": [
        {"model": "m", "mode": "train", "compiled": False, "batch": 256, "stock": {"img_per_s": 100.0},
         "visattn": {"img_per_s": 110.0}, "floor": {"img_per_s": 130.0}, "speedup": 1.1, "amdahl_bound": 1.3}]}
    newer = json.loads(json.dumps(older))
    newer["rows"][0].update(visattn={"img_per_s": 125.0}, speedup=1.25)
    results = [(Path("timm-inplace-a.json"), "timm-inplace", older),
               (Path("timm-inplace-b.json"), "timm-inplace", newer)]
    text = report.timm_inplace_section(results)
    row = next(line for line in text.splitlines() if line.startswith("| m | train |"))
    assert "| 125 |" in row and "1.25" in row and "timm-inplace-b.json" in row and "| 110 |" not in text
    video = {"bench": "video-sparse", "device": "GPU X", "rows": [
        {"grid": "g", "pattern": "radial", "density": 0.25, "fwd_ms": 50.0, "fwd_bwd_ms": 200.0,
         "speedup_vs_dense_fwd": 2.0, "flex_fwd_ms": 40.0},
        {"grid": "g", "pattern": "vmoba", "error": "boom"}]}
    text = report.video_sparse_section([(Path("video-sparse-x.json"), "video-sparse", video)])
    assert "| g | radial | 0.25 | 50 | 200 | 2 |" in text and "vmoba" not in text


def test_page_sections_skip_a_tried_change_that_did_not_land(tmp_path):
    def engine_file(name, fwd_ms, provenance):
        rows = [{"stage": "nat_s3", "rpb": False, "fwd_ms": fwd_ms, "fwd_bwd_ms": 3 * fwd_ms},
                {"stage": "nat_s3", "dense": "cudnn", "fwd_ms": 0.2, "fwd_bwd_ms": 0.6}]
        data = {"bench": "engine-profile", "date": "2026-12-07", "device": "GPU X", "rows": rows,
                "provenance": provenance}
        (tmp_path / name).write_text(json.dumps(data))

    engine_file("engine-x-2026-12-07-run1.json", 0.111, {"tree": "main"})
    engine_file("engine-x-2026-12-07-run2.json", 0.999, {"tree": "a branch", "landed": False})
    page = report.render_perf(report.load_results(tmp_path), "# Performance")
    row = next(line for line in page.splitlines() if line.startswith("| nat_s3 | no |"))
    assert "engine-x-2026-12-07-run1.json" in row and "0.111" in row and "0.999" not in page
    assert "| engine-x-2026-12-07-run2.json |" in page  # still listed as a result file
    engine_file("engine-x-2026-12-07-run2.json", 0.999, {"tree": "landed later"})  # without the flag it is newest
    assert "0.999" in report.render_perf(report.load_results(tmp_path), "# Performance")
