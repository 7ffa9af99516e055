"""Command-line spelling and reporting (issue 19, "CLI and messages"): one documented dtype spelling accepted with
the long names on every command, a user-facing ``bench --help``, and the attention backend every bench row ran."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest
import torch

from visattn import backends, cli
from visattn.bench import models


def _bench_args(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser(load="bench").parse_args(["bench", *argv])


@pytest.mark.parametrize("short,long,dtype", [("fp32", "float32", torch.float32), ("fp16", "float16", torch.float16),
                                              ("bf16", "bfloat16", torch.bfloat16)])
def test_bench_and_smoke_take_both_dtype_spellings(short, long, dtype):
    for name in (short, long):
        settings = models.settings_from_args(_bench_args(["--precision", name]), "cpu")
        assert settings.model_dtype == dtype and settings.amp_dtype is None
        assert settings.precision == long  # result files keep timm's names
        for flag in ("--dtype", "--precision"):
            assert cli.build_parser(load="smoke").parse_args(["smoke", flag, name]).dtype == short
    amp = models.settings_from_args(_bench_args(["--amp", "--amp-dtype", "bf16"]), "cpu")
    assert amp.precision == "amp_bfloat16" and amp.amp_dtype == torch.bfloat16 and amp.model_dtype == torch.float32
    assert models.settings_from_args(_bench_args(["--precision", "amp_bf16"]), "cpu").precision == "amp_bfloat16"


@pytest.mark.parametrize("command", ["bench-agent", "bench-bra"])
def test_kernel_benchmarks_take_both_dtype_spellings(command):
    parser = cli.build_parser(load=command)
    assert parser.parse_args([command, "--dtype", "float16"]).dtype == "fp16"
    assert parser.parse_args([command, "--dtype", "bf16"]).dtype == "bf16"


def test_prune_kernels_takes_both_dtype_spellings(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run")
    for name in ("float16", "bf16"):  # parsed, then stopped at the missing GPU
        assert cli.main(["bench-prune-kernels", "--dtype", name]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench-prune-kernels", "--dtype", "fp64"])


def test_a_bad_dtype_lists_the_documented_spelling(capsys):
    with pytest.raises(SystemExit):
        _bench_args(["--precision", "fp64"])
    assert "choose one of fp32, fp16, bf16, amp, amp_bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser(load="smoke").parse_args(["smoke", "--precision", "fp64"])
    assert "choose from 'auto', 'fp32', 'fp16', 'bf16'" in capsys.readouterr().err.replace('"', "'")


@pytest.mark.parametrize("flag,good,bad,message", [
    ("--dtypes", "fp16,bfloat16", ("fp64",), "choose from fp32,fp16,bf16"),  # both dtype spellings accepted
    ("--ranks", "3", ("4", "1,x", ""), "a comma list drawn from 1,2,3"),
])
def test_check_flags_are_validated_before_the_gpu(capsys, flag, good, bad, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: check would run")
    assert cli.main(["check", flag, good]) == 2  # accepted: stops at the missing GPU
    out = capsys.readouterr()
    assert "needs a CUDA GPU" in out.out and flag not in out.err
    for value in bad:
        assert cli.main(["check", flag, value]) == 2
        assert f"{flag}={value!r}: {message}" in capsys.readouterr().err


def test_bench_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert models.DESCRIPTION.splitlines()[0] in text
    assert "``" not in text  # the module docstring's reStructuredText is for developers
    assert "--backend {auto,reference,triton}" in text and "{fp32,fp16,bf16,amp,amp_bf16}" in text


# ------------------------------------------------------------------------------------------------ backend column
TINY_SWIN = ["-m", "swin_tiny_patch4_window7_224", "--img-size", "56", "-b", "1", "--num-bench-iter", "1",
             "--model-kwargs", "embed_dim=16", "depths=(1, 1)", "num_heads=(1, 2)"]


def test_every_row_names_the_backend_that_ran():
    """A timm Swin, its @visattn twin on the CPU under "auto" (timm's own path: no visattn op runs) and under a
    forced reference backend (visattn's ops run)."""
    settings = models.settings_from_args(_bench_args(TINY_SWIN), "cpu")
    stock = models.bench_model(models.ModelSpec("swin_tiny_patch4_window7_224"), settings, "both")
    twin = models.ModelSpec("swin_tiny_patch4_window7_224", visattn_swin=True)
    assert stock["backend"] == "timm"
    assert models.bench_model(twin, settings, "inference")["backend"] == "timm"
    with backends.use_backend("reference", "attention"):
        assert models.bench_model(twin, settings, "both")["backend"] == "reference"
        compiled = models.bench_model(models.ModelSpec(twin.name, True, compiled=True),
                                      models.settings_from_args(_bench_args([*TINY_SWIN, "--torchcompile", "eager"]),
                                                                "cpu"), "inference")
        assert compiled["backend"] == "reference"  # probed eagerly: a compiled graph records nothing


def test_backend_flag_forces_the_backend_for_the_run(tmp_path):
    import json

    out = tmp_path / "r.json"
    argv = ["-m", "swin_tiny_patch4_window7_224@visattn", *TINY_SWIN[2:], "--device", "cpu", "--bench", "inference",
            "--results-file", str(out), "--no-progress"]
    assert models.main([*argv, "--backend", "reference"]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["attention_backend"] == "reference"
    assert [r["backend"] for r in data["rows"]] == ["reference"]
    assert backends.get_backend("attention") == "auto"  # restored after the run
    assert models.main([*argv, "--backend", "triton"]) == 1  # on the CPU: an error row saying why, not timm's path
    row = json.loads(out.read_text())["rows"][0]
    assert "backend='triton' cannot run" in row["error"]


def test_table_names_its_ratio_columns_and_backends():
    rows = [{"model": "a", "backend": "timm", "infer_samples_per_sec": 10.0, "infer_batch_size": 2},
            {"model": "a@visattn", "backend": "triton", "infer_samples_per_sec": 15.0, "infer_batch_size": 2}]
    models.add_ratios(rows)
    table = models.format_table(rows)
    assert "x first" not in table and "x row1" in table.splitlines()[0]
    assert "x row1 (infer): img/s relative to a (10.0 img/s)" in table
    assert " triton " in table.splitlines()[2] and " timm " in table.splitlines()[1]
    assert models.describe_backends(Counter()) == "timm"
    assert models.describe_backends(Counter({"reference": 2, "triton": 5})) == "triton+reference"
