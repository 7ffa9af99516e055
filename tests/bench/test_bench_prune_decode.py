"""``visattn bench-prune`` decode measurement (issue 25): step marks, per-call tokens/s, pooling over interleaved
rounds, the slower-than-unpruned flag, the run-to-run comparison, and an end-to-end tiny CPU run.

The expected numbers are worked out by hand from the synthetic inputs (scripted clocks, hand-made rows)."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from bench_scripts import load_benchmark, read_strict_json

from visattn.bench import prune


class _ScriptedClock:
    """``time.perf_counter`` replacement returning the given seconds in order."""

    def __init__(self, seconds):
        self.seconds = list(seconds)

    def __call__(self):
        return self.seconds.pop(0)


def test_spread_is_median_min_max_of_the_finite_values():
    assert prune.spread([3.0, 1.0, float("nan"), 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    empty = prune.spread([float("nan")])
    assert empty["n"] == 0 and math.isnan(empty["median"]) and math.isnan(empty["min"])


def test_step_marks_on_cpu_are_perf_counter_intervals(monkeypatch):
    marks = prune.StepMarks("cpu", 3)
    assert marks.kind == "perf_counter"
    monkeypatch.setattr(prune.time, "perf_counter", _ScriptedClock([10.0, 10.5, 10.52, 10.55]))
    marks.start()
    scores = torch.zeros(2, 5)
    for _ in range(3):
        assert marks(torch.zeros(2, 1, dtype=torch.long), scores) is scores  # scores pass through untouched
    assert marks.intervals_ms() == pytest.approx([500.0, 20.0, 30.0])
    with pytest.raises(ValueError, match="steps"):
        prune.StepMarks("cpu", 0)


@pytest.mark.gpu
def test_step_marks_on_cuda_are_events_that_time_the_stream():
    """Two marks around ~0.05 s of GPU spinning (torch.cuda._sleep) and two around none: the event intervals see
    the spin on the stream, not the microseconds the host took to queue it."""
    marks = prune.StepMarks("cuda", 2)
    assert marks.kind == "cuda_events"
    x = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 1_500_000)  # SM clock in kHz (older torch: ~)
    cycles = int(0.05 * khz * 1e3)
    marks.start()
    torch.cuda._sleep(cycles)
    marks(x, x)
    marks(x, x)
    spin, nothing = marks.intervals_ms()
    assert 20.0 < spin < 500.0 and nothing < 1.0


class _FakeGenerator:
    """Stands in for a HF model: ``generate`` calls the logits processors once per new token, like HF's loop."""

    def __init__(self, eos=None, stop_after=None):
        self.generation_config = types.SimpleNamespace(eos_token_id=eos)
        self.stop_after = stop_after
        self.calls = []

    def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample, logits_processor, **kwargs):
        self.calls.append((max_new_tokens, min_new_tokens, do_sample))
        made = max_new_tokens if self.stop_after is None else self.stop_after
        new = torch.full((input_ids.shape[0], made), 7)
        if self.stop_after is not None:
            new[:, -1] = self.generation_config.eos_token_id
        for _ in range(made):
            logits_processor(input_ids, torch.zeros(input_ids.shape[0], 10))
        return torch.cat([input_ids, new], 1)


def test_decode_figures_from_scripted_steps(monkeypatch):
    """3 generate() calls of 4 tokens, batch 2: warm-up, then 2 timed; decode = the 3 steps after the first token."""
    # each call: start mark, then one mark per token (first = prefill)
    clock = [0.0, 1.0, 1.1, 1.2, 1.3,          # warm-up: steps 100 ms each -> 300 ms
             5.0, 5.2, 5.25, 5.30, 5.35,       # timed 1: generate TTFT 200 ms, steps 50 ms -> 150 ms
             9.0, 9.1, 9.2, 9.3, 9.4]          # timed 2: generate TTFT 100 ms, steps 100 ms -> 300 ms
    monkeypatch.setattr(prune.time, "perf_counter", _ScriptedClock(clock))
    model = _FakeGenerator()
    out = prune.measure_decode(model, {"input_ids": torch.zeros(2, 6, dtype=torch.long)}, 4, 2, "cpu")
    assert model.calls == [(4, 4, False)] * 3  # min_new_tokens = max_new_tokens, greedy
    assert out["decode_warmup_ms"] == pytest.approx(300.0)
    assert out["decode_calls_ms"] == pytest.approx([150.0, 300.0])
    assert out["decode_samples_tok_s"] == pytest.approx([2 * 3 / 0.150, 2 * 3 / 0.300])  # 40 and 20 tok/s
    assert out["decode_tok_s"] == pytest.approx(30.0)  # median of two = their mean
    assert (out["decode_tok_s_min"], out["decode_tok_s_max"]) == pytest.approx((20.0, 40.0))
    assert out["decode_step_ms"] == pytest.approx(75.0)  # median of 50, 50, 50, 100, 100, 100
    assert out["decode_step_max_ms"] == pytest.approx(100.0)
    assert out["generate_ttft_ms"] == pytest.approx(150.0)
    assert out["new_tokens"] == 4 and out["new_tokens_per_sample"] == [4, 4]


def test_decode_refuses_a_short_generation_and_bad_arguments():
    inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
    with pytest.raises(RuntimeError, match="new tokens per sample"):
        prune.decode_call(_FakeGenerator(eos=2, stop_after=2), inputs, 4, "cpu")
    with pytest.raises(ValueError, match="decode_tokens"):
        prune.measure_decode(_FakeGenerator(), inputs, 1, 2, "cpu")
    with pytest.raises(ValueError, match="decode_calls"):
        prune.measure_decode(_FakeGenerator(), inputs, 4, 0, "cpu")
    with pytest.raises(ValueError, match="--decode-tokens"):
        prune.main(["--tiny", "--decode-tokens", "1"])


def test_new_tokens_per_sample_stops_at_the_first_eos():
    generated = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert prune.new_tokens_per_sample(generated, 2) == [2, 4, 1]
    assert prune.new_tokens_per_sample(generated, [9, 7]) == [4, 3, 4]
    assert prune.new_tokens_per_sample(generated, None) == [4, 4, 4]


def _row(method, round_, samples, ttft=50.0, shape="llava-1.5", batch=8):
    return {"shape": shape, "batch": batch, "method": method, "keep_per_image": None if method == "none" else 64,
            "round": round_, "ttft_ms": ttft, "llm_prefill_ms": ttft / 2, "decode_samples_tok_s": samples,
            "decode_calls_ms": [1000.0 / s for s in samples], "decode_warmup_ms": 10.0 * (round_ + 1),
            "decode_step_ms": 20.0 + round_, "decode_step_max_ms": 30.0 + round_, "new_tokens": 16}


def test_rounds_pool_every_timed_call_for_decode():
    rows = [_row("none", 0, [100.0, 104.0], 170.0), _row("fastv", 0, [300.0, 310.0], 60.0),
            _row("none", 1, [98.0, 102.0], 180.0), _row("fastv", 1, [150.0, 290.0], 55.0),
            _row("none", 2, [101.0, 99.0], 175.0), _row("fastv", 2, [305.0, 295.0], 70.0)]
    out = {r["method"]: r for r in prune._median_rounds(rows)}
    fastv = out["fastv"]
    assert fastv["ttft_ms"] == 60.0 and fastv["round"] == 0  # TTFT: the median round, as before
    assert fastv["decode_samples_tok_s"] == [300.0, 310.0, 150.0, 290.0, 305.0, 295.0]  # in round order
    assert fastv["decode_tok_s"] == pytest.approx((295.0 + 300.0) / 2)
    assert (fastv["decode_tok_s_min"], fastv["decode_tok_s_max"]) == (150.0, 310.0)
    assert fastv["round_decode_tok_s"] == pytest.approx([305.0, 220.0, 300.0])
    assert fastv["round_decode_warmup_ms"] == [10.0, 20.0, 30.0]
    assert fastv["decode_step_ms"] == 21.0 and fastv["decode_step_max_ms"] == 32.0
    assert out["none"]["decode_tok_s"] == pytest.approx(100.5)


def test_rounds_keep_every_graph_decode_check():
    """Graph mode: a round that fell back to the eager step or whose tokens differed from generate() shows in the
    pooled row (the median-TTFT round alone might hide it)."""
    graph = dict(decode_mode="graph", decode_graph_error=None, decode_tokens_match=True)
    rows = [_row("fastv", 0, [300.0], 60.0) | graph, _row("fastv", 2, [290.0], 70.0) | graph,
            _row("fastv", 1, [280.0], 80.0) | dict(decode_mode="static-eager", decode_graph_error="RuntimeError: x",
                                                   decode_tokens_match=False)]
    (row,) = prune._median_rounds(rows)
    assert row["round"] == 2 and row["decode_tokens_match"] is False
    assert row["round_decode_tokens_match"] == [True, False, True]  # round order
    assert row["decode_mode"] == "graph+static-eager" and row["decode_graph_error"] == "RuntimeError: x"
    (clean,) = prune._median_rounds([rows[0], rows[1]])
    assert clean["decode_tokens_match"] is True and clean["decode_mode"] == "graph"
    assert clean["decode_graph_error"] is None
    text = prune.graph_decode_checks([row, clean])
    assert text.startswith("(1 of 2 rows fell back") and "in 1 of 2 checked rows" in text


def _figure(method, median, lo, hi, shape="llava-1.5", batch=8, keep=64):
    return {"shape": shape, "batch": batch, "method": method, "keep_per_image": None if method == "none" else keep,
            "decode_tok_s": median, "decode_tok_s_min": lo, "decode_tok_s_max": hi}


def test_flag_marks_pruned_rows_slower_than_the_baseline_beyond_the_spread():
    rows = [dict(_figure("none", 110.0, 100.0, 120.0), decode_samples_tok_s=[100.0, 110.0, 120.0]),
            dict(_figure("fastervlm", 90.0, 85.0, 95.0), decode_samples_tok_s=[85.0, 95.0]),  # below: flagged
            _figure("visionzip", 98.0, 90.0, 105.0),    # slower median, but the ranges overlap: not flagged
            _figure("divprune", 300.0, 280.0, 320.0),   # faster
            _figure("fastv", 50.0, 40.0, 60.0, batch=1),  # no unpruned row at batch 1: undecided
            _figure("fastv", float("nan"), float("nan"), float("nan"))]  # no figure: undecided
    flagged = prune.flag_slow_decode(rows)
    assert [r["decode_slower_than_baseline"] for r in rows] == [None, True, False, False, None, None]
    assert rows[1]["decode_vs_baseline"] == pytest.approx(90.0 / 110.0)
    assert rows[3]["decode_vs_baseline"] == pytest.approx(300.0 / 110.0)
    assert [(f["method"], f["baseline"]["decode_tok_s_min"]) for f in flagged] == [("fastervlm", 100.0)]
    assert flagged[0]["decode_flag_chance"] == pytest.approx(0.1)  # 2 of 5 exchangeable calls the slowest: 1/C(5,2)
    assert rows[2]["decode_flag_chance"] is None  # no per-call samples to count
    text = prune.table([dict(r, shape=r["shape"], ttft_ms=1.0, ttft_speedup=1.0, llm_prefill_ms=1.0,
                             prefill_tok_s=1.0, peak_gib=1.0, scoring_pct=0.0) for r in rows[:3]])
    assert text.count("slower than none") == 1 and "90 [85–95] **slower than none**" in text


def test_compare_runs_passes_within_the_tolerance_only():
    a = {"configs": [_figure("none", 100.0, 95.0, 105.0), _figure("fastv", 300.0, 290.0, 310.0),
                     _figure("divprune", 200.0, 190.0, 210.0), _figure("visionzip", 250.0, 240.0, 260.0)]}
    b = {"configs": [_figure("none", 109.0, 100.0, 110.0),     # +9 %
                     _figure("fastv", 266.0, 250.0, 280.0),    # -11.3 %
                     _figure("divprune", None, None, None),   # no figure (null in the file)
                     _figure("pdrop", 50.0, 45.0, 55.0)]}     # visionzip missing, pdrop extra
    entries, ok = prune.compare_runs(a, b)
    verdict = {e["config"][2]: (e["passed"], e["diff"]) for e in entries}
    assert not ok
    assert verdict["none"][0] and verdict["none"][1] == pytest.approx(0.09)
    assert not verdict["fastv"][0] and verdict["fastv"][1] == pytest.approx(-34.0 / 300.0)
    assert verdict["divprune"] == (False, None)
    assert verdict["visionzip"] == (False, None) and verdict["pdrop"] == (False, None)
    assert prune.compare_runs(a, a)[1]  # a run agrees with itself
    text = prune.comparison_table(entries)
    assert text.count("PASS") == 1 and text.count("FAIL") == 4
    with pytest.raises(ValueError, match="tolerance"):
        prune.compare_runs(a, b, tolerance=10)


def test_compare_files_exit_code(tmp_path, capsys):
    paths = []
    for name, value in (("a", 100.0), ("b", 105.0), ("c", 130.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"configs": [_figure("none", value, value - 1, value + 1)]}))
        paths.append(str(path))
    assert prune.compare_files(paths[0], paths[1]) == 0
    assert "PASS: 1/1" in capsys.readouterr().out
    assert prune.compare_files(paths[0], paths[2]) == 1
    assert "FAIL: 0/1" in capsys.readouterr().out


def test_bench_prune_tiny_end_to_end(tmp_path, monkeypatch):
    """A tiny random LLaVA on the CPU through main(): the result file's header, the decode fields of every row, and
    exactly N new tokens per sample even though the model's favourite token is the Llama end-of-sequence id (2)."""
    pytest.importorskip("transformers")
    build = prune.build_model

    def eos_loving_model(*args, **kwargs):
        model = build(*args, **kwargs)

        def favour_eos(module, inputs, output):
            output = output.clone()
            output[..., 2] = output.max() + 100.0
            return output

        model.lm_head.register_forward_hook(favour_eos)
        return model

    monkeypatch.setattr(prune, "build_model", eos_loving_model)
    out = tmp_path / "prune-test.json"
    tokens, calls = 4, 2
    assert prune.main(["--tiny", "--methods", "visionzip", "--batches", "2", "--next-batches", "1",
                       "--decode-tokens", str(tokens), "--decode-calls", str(calls), "--out", str(out)]) == 0
    result = read_strict_json(out)
    for key in ("device", "torch", "triton", "transformers", "date", "timer", "decode_flags"):
        assert key in result
    assert result["timer"] == "perf_counter" and result["device"] == "cpu"
    assert result["torch"] == torch.__version__ and result["decode_tokens"] == tokens
    assert {(r["shape"], r["method"]) for r in result["configs"]} == {
        ("llava-1.5", "none"), ("llava-1.5", "visionzip"), ("llava-next", "none"), ("llava-next", "visionzip")}
    for r in result["configs"]:
        assert r["new_tokens_per_sample"] == [tokens] * r["batch"]
        assert len(r["decode_calls_ms"]) == calls and all(ms > 0 for ms in r["decode_calls_ms"])
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["decode_tok_s"] == pytest.approx(
            prune.spread([r["batch"] * (tokens - 1) / ms * 1e3 for ms in r["decode_calls_ms"]])["median"])
        assert "decode_slower_than_baseline" in r and "decode_warmup_ms" in r and "decode_step_ms" in r
        assert (r["decode_slower_than_baseline"] is None) == (r["method"] == "none")
    assert "median [min–max] of 2 calls" in prune.markdown(result)


@pytest.mark.slow
def test_bench_prune_tiny_graph_mode_end_to_end(tmp_path):
    """``--decode-mode graph`` through main() on the CPU: the mode in the header and every row (the eager step:
    no capture off CUDA), each row's tokens checked against generate(), static caches smaller when pruned."""
    pytest.importorskip("transformers")
    out = tmp_path / "prune-graph.json"
    assert prune.main(["--tiny", "--methods", "fastv", "--batches", "2", "--next-batches", "1", "--decode-mode",
                       "graph", "--decode-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decode_mode"] == "graph" and result["kv_cache"] == "static per layer"
    rows = {(r["shape"], r["method"]): r for r in result["configs"]}
    for r in rows.values():
        assert r["decode_mode"] == "static-eager" and r["decode_graph_error"] is None
        assert r["decode_tokens_match"] is True and r["new_tokens_per_sample"] == [4] * r["batch"]
    for shape in ("llava-1.5", "llava-next"):
        assert sum(rows[(shape, "fastv")]["static_cache_tokens"]) < sum(rows[(shape, "none")]["static_cache_tokens"])
    page = prune.markdown(result)
    assert "CUDA graph" in page and "(4 of 4 rows fell back to the eager step" in page
    assert "equal `generate()`'s in 4 of 4 checked rows" in page


def test_dymu_row_finds_thresholds_that_merge_towards_the_budget():
    """bench-prune's DyMU row: thresholds from DToMe on the row's own images (r spread over the layers before the
    feature layer); the merged image keeps fewer tokens than it had and the count is reported."""
    from visattn import tokenprune as tp

    model = prune.build_model(True, "cpu", torch.float32)
    inputs = prune.make_inputs(model, 2, 1, "cpu", torch.float32)
    per_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    pruner = prune.dymu_for(model, inputs["pixel_values"], 4, per_image)
    layers = model.config.vision_config.num_hidden_layers
    assert isinstance(pruner, tp.DyMU) and len(pruner.thresholds) == layers
    assert pruner.thresholds[-1] is None  # the last layer lies past the feature layer (-2): no merging there
    tp.apply(model, pruner)
    try:
        with torch.no_grad():
            model(**inputs)
        kept = tp.last_report(model).visual_tokens_kept
    finally:
        tp.remove(model)
    assert all(1 <= k < per_image for k in kept), kept


def test_refused_configuration_is_skipped_and_the_run_goes_on(tmp_path):
    """A budget a method refuses at ``tp.apply`` (Pooling: 3 is no pooled size of the tiny 4 x 4 grid) is a
    ``skipped`` entry with the method's reason; the rows after it still run (keep 4, a 2 x 2 pool). DyMU's rows
    (no budget: thresholds found for about each keep) say which mode ran (the language model on the merged
    tokens, no virtual unmerging)."""
    out = tmp_path / "prune-refused.json"
    assert prune.main(["--tiny", "--methods", "pooling,dymu", "--keeps", "3,4", "--batches", "1", "--next-batches", "",
                       "--decode-tokens", "2", "--decode-calls", "1", "--out", str(out), "--doc", ""]) == 0
    result = json.loads(out.read_text())
    rows = [(r["method"], r["keep_per_image"]) for r in result["configs"]]
    assert rows == [("none", None), ("pooling", 4), ("dymu", 3), ("dymu", 4)]
    assert all(r["unmerge"] == "none" and len(r["thresholds"]) == 4 for r in result["configs"][2:])
    assert all(r["kept_stable"] for r in result["configs"][1:])  # the same kept counts in every timed call
    (skip,) = result["skipped"]
    assert (skip["method"], skip["keep"]) == ("pooling", 3)
    assert skip["reason"].startswith("refused: keep=3") and "not a pooled size" in skip["reason"]


def test_profile_dymu_script_tiny(tmp_path):
    """benchmarks/profile_dymu.py on the tiny model (CPU): every CPU variant runs, the merged rows' shapes are the
    same in every call (the CPU merge adds in index order), the result is strict JSON."""
    out = tmp_path / "profile-dymu.json"
    assert load_benchmark("profile_dymu").main(["--tiny", "--calls", "2", "--out", str(out)]) == 0
    result = read_strict_json(out)
    variants = result["variants"]
    assert set(variants) == {"none", "dymu", "dymu-scatter", "dymu-other-thresholds", "dymu-virtual"}
    assert all(not v["shapes_vary"] and v["lm_finite"] and len(v["calls"]) == 2 for v in variants.values())
    merged = variants["dymu"]["calls"][0]
    assert merged["lm_len"] < variants["none"]["calls"][0]["lm_len"]  # the merged images are shorter
    assert merged["tower_widths"] == variants["dymu-scatter"]["calls"][0]["tower_widths"]  # same merge on the CPU
    assert set(result["profiles"]) == {"dymu", "dymu-scatter"}
