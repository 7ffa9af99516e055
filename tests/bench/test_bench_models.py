"""`visattn bench`: timm benchmark.py's flags and keys, batch decay on out-of-memory, strict JSON / CSV files."""

import csv
import json

import pytest
import timm
import torch
from timm.models import register_model
from torch import nn

from visattn.bench import models
from visattn.bench.common import strict, write_json

# Flag names of timm's benchmark.py (github.com/huggingface/pytorch-image-models, benchmark.py) that matter for
# a step's cost, with a value each; `visattn bench` must accept every one with the same meaning.
TIMM_FLAGS = [
    ["--model", "resnet50"], ["-m", "resnet18"], ["--model-list", "models.txt"], ["--bench", "train"],
    ["--no-retry"], ["--results-file", "r.csv"], ["--results-format", "json"], ["--num-warm-iter", "3"],
    ["--num-bench-iter", "7"], ["--device", "cpu"], ["-b", "32"], ["--batch-size", "32"], ["--img-size", "160"],
    ["--input-size", "3", "192", "192"], ["--use-train-size"], ["--num-classes", "10"], ["--gp", "avg"],
    ["--channels-last"], ["--grad-checkpointing"], ["--amp"], ["--amp-dtype", "bfloat16"],
    ["--precision", "bfloat16"], ["--fast-norm"], ["--reparam"], ["--model-kwargs", "drop_rate=0.1"],
    ["--torchcompile-mode", "max-autotune"], ["--torchcompile"], ["--torchcompile", "aot_eager"],
    ["--opt", "adamw"], ["--opt-eps", "1e-8"], ["--opt-betas", "0.9", "0.99"], ["--momentum", "0.8"],
    ["--weight-decay", "0.05"], ["--clip-grad", "1.0"], ["--clip-mode", "value"], ["--smoothing", "0.0"],
    ["--drop", "0.1"], ["--drop-path", "0.1"], ["--drop-block", "0.1"], ["--lr", "0.001"],
]


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    models.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("flag", TIMM_FLAGS, ids=lambda f: f[0])
def test_every_timm_benchmark_flag_is_accepted(flag):
    _parse(flag)


def test_timm_flag_meanings():
    args = _parse(["-m", "nat_tiny", "swin_*", "-m", "vit_small_patch16_224", "-b", "64", "--amp", "--amp-dtype",
                   "bfloat16", "--torchcompile", "--model-kwargs", "drop_rate=0.1", "act_layer=gelu", "depth=(1, 2)",
                   "--input-size", "3", "160", "192", "--bench", "inference"])
    assert args.model == ["nat_tiny", "swin_*", "vit_small_patch16_224"]  # several names, wildcards kept
    assert args.torchcompile == "inductor"  # bare --torchcompile means inductor, as timm
    assert args.model_kwargs == {"drop_rate": 0.1, "act_layer": "gelu", "depth": (1, 2)}  # literals, else strings
    settings = models.settings_from_args(args, "cpu")
    assert settings.precision == "amp_bfloat16" and settings.amp_dtype == torch.bfloat16  # --amp overrides
    assert settings.model_dtype == torch.float32 and settings.batch_size == 64
    assert settings.input_size == (3, 160, 192)
    assert _parse([]).bench == "both"  # timm's default
    with pytest.raises(SystemExit):
        _parse(["--bench", "profile"])  # a mode visattn does not implement is refused, not ignored


def test_model_specs_expand_wildcards_and_add_visattn_and_compiled_twins():
    args = _parse(["-m", "swin_tiny_patch4_window7_224", "nat_mini", "--visattn-swin", "--compare-compile"])
    labels = [s.label for s in models.resolve_models(args)]
    assert labels == ["swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224@visattn", "nat_mini",
                      "swin_tiny_patch4_window7_224 (compiled)", "swin_tiny_patch4_window7_224@visattn (compiled)",
                      "nat_mini (compiled)"]
    wild = [s.name for s in models.resolve_models(_parse(["-m", "dinat_*"]))]
    assert wild == timm.list_models("dinat_*") and "dinat_tiny" in wild
    with pytest.raises(ValueError, match="no_such_model"):
        models.resolve_models(_parse(["-m", "no_such_model"]))
    with pytest.raises(ValueError, match="suffix"):
        models.parse_spec("nat_tiny@fast")


# ----------------------------------------------------------------------------------------------- fake models
class _ConvNet(nn.Module):
    """3->64 3x3 conv at 224² + global pool + 64->10 linear: 224·224·64·27 + 640 = 86,704,768 MACs per image."""

    def __init__(self, num_classes=10, fail_above=None, error=None, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.head = nn.Linear(64, num_classes, bias=False)
        self.fail_above, self.error = fail_above, error
        self.seen_batches = []
        self.pretrained_cfg = {"input_size": (3, 224, 224)}

    def forward(self, x):
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            _ATTEMPTS.append(x.shape[0])
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.head(self.conv(x).mean((2, 3)))


_ATTEMPTS: list[int] = []


@register_model
def _bench_test_convnet(pretrained=False, **kwargs):
    return _ConvNet(**kwargs)


@register_model
def _bench_test_oom(pretrained=False, **kwargs):
    return _ConvNet(fail_above=5, error=torch.OutOfMemoryError, **kwargs)


@register_model
def _bench_test_broken(pretrained=False, **kwargs):
    return _ConvNet(fail_above=0, error=ValueError, **kwargs)


def _settings(**overrides):
    args = _parse(["--device", "cpu", "--num-bench-iter", "2", "--img-size", "32"] + overrides.pop("argv", []))
    return models.settings_from_args(args, "cpu")


def test_out_of_memory_decays_the_batch_as_timm():
    """timm's decay_batch_step (2 steps per power of two): 16 -> 12 -> 8 -> 6 -> 4; 4 fits under the fake limit 5."""
    _ATTEMPTS.clear()
    row = models.bench_model(models.ModelSpec("_bench_test_oom"), _settings(argv=["-b", "16"]), "inference",
                             log=lambda *a: None)
    assert _ATTEMPTS == [16, 12, 8, 6] and row["infer_batch_size"] == 4 and "error" not in row


def test_other_errors_and_no_retry_are_not_decayed():
    row = models.bench_model(models.ModelSpec("_bench_test_broken"), _settings(argv=["-b", "16"]), "both")
    assert row["error"].startswith("infer: ValueError") and row["tried_batch_sizes"] == [16]
    _ATTEMPTS.clear()
    row = models.bench_model(models.ModelSpec("_bench_test_oom"), _settings(argv=["-b", "16", "--no-retry"]),
                             "inference")
    assert row["tried_batch_sizes"] == [16] and "OutOfMemoryError" in row["error"]


def test_gmacs_and_param_count_match_hand_counts():
    settings = _settings(argv=["-b", "2"])
    spec = models.ModelSpec("_bench_test_convnet")
    assert models.count_gmacs(spec, settings, (3, 224, 224)) == round(86_704_768 / 1e9, 2)
    row = models.bench_model(spec, settings, "inference")
    assert row["param_count"] == round((64 * 27 + 640) / 1e6, 2)


def test_results_json_and_csv_have_timm_keys_and_are_strict(tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    argv = ["-m", "_bench_test_convnet", "test_vit", "--device", "cpu", "-b", "2", "--num-bench-iter", "2",
            "--img-size", "64"]
    assert models.main(argv + ["--results-file", str(out_json)]) == 0
    data = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    for key in ("date", "device", "torch", "triton", "timm", "python", "settings", "rows"):
        assert key in data
    first, second = data["rows"]
    for key in ("model", "param_count", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                "infer_img_size", "infer_gmacs", "infer_peak_mem_mib", "train_samples_per_sec", "train_step_time",
                "train_batch_size", "train_img_size", "infer_ratio_to_first", "train_ratio_to_first"):
        assert key in first and key in second, key
    assert first["infer_ratio_to_first"] == 1.0
    assert second["infer_ratio_to_first"] == pytest.approx(
        second["infer_samples_per_sec"] / first["infer_samples_per_sec"], rel=1e-3, abs=5e-5)  # stored to 4 places
    assert first["infer_samples_per_sec"] == pytest.approx(2 / first["infer_step_time"] * 1e3, rel=1e-2)
    assert first["infer_img_size"] == 64 and first["infer_batch_size"] == 2
    assert models.main(argv[:2] + argv[3:] + ["--bench", "train", "--results-file", str(out_csv)]) == 0
    with out_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["model"] == "_bench_test_convnet" and float(rows[0]["train_samples_per_sec"]) > 0
    assert "infer_samples_per_sec" not in rows[0] and rows[0]["device"] and rows[0]["torch"] == torch.__version__
    table = capsys.readouterr().out
    assert "train img/s" in table and "_bench_test_convnet" in table


def test_strict_json_turns_nan_and_inf_into_null(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.float16})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": "float16"}
    assert strict({"k": (float("-inf"),)}) == {"k": [None]}


@pytest.mark.slow  # nat_mini on the CPU reference path: minutes on a loaded 2-core machine
def test_nat_mini_runs_both_phases_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    assert models.main(["--model", "nat_mini", "--device", "cpu", "--bench", "both", "-b", "2", "--img-size", "64",
                        "--num-bench-iter", "1", "--results-file", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["infer_samples_per_sec"] > 0 and row["train_samples_per_sec"] > 0


def test_compare_compile_adds_compiled_inference_rows_and_time_budget_skips(tmp_path):
    out = tmp_path / "c.json"
    argv = ["-m", "_bench_test_convnet", "--device", "cpu", "-b", "2", "--num-bench-iter", "2", "--img-size", "32",
            "--compare-compile", "--torchcompile", "eager", "--results-file", str(out)]
    assert models.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["_bench_test_convnet", "_bench_test_convnet (compiled)"]
    assert "train_samples_per_sec" in rows[0] and "train_samples_per_sec" not in rows[1]  # compiled: inference
    assert rows[1]["infer_samples_per_sec"] > 0
    assert models.main(argv + ["--time-budget", "0"]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["skipped"] == ["_bench_test_convnet", "_bench_test_convnet (compiled)"]
