"""The command line: one command table, info reports backends and kernels, smoke passes on the bundled photo and
fails loudly when wrong, and every command's module follows the add_arguments / run contract."""

import importlib
import types

import pytest

from visattn import backends, cli, reference
from visattn.bench import smoke


def test_info_lists_every_op_backend_and_registered_kernel_by_family(capsys, monkeypatch):
    monkeypatch.setitem(backends._KERNELS, "fake_rowscore", backends.KernelEntry(
        "fake_rowscore", "tokenprune", lambda device: "needs a GPU", "a test entry"))
    monkeypatch.setitem(backends._KERNELS, "fake_na", backends.KernelEntry("fake_na", "attention", lambda d: None))
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "timm" in out
    lines = out.splitlines()
    attention, tokenprune = lines.index("  attention:"), lines.index("  tokenprune:")
    under = {"attention": lines[attention + 1:tokenprune], "tokenprune": lines[tokenprune + 1:]}
    fake_na = [line for line in under["attention"] if "fake_na" in line]
    fake_rowscore = [line for line in under["tokenprune"] if "fake_rowscore" in line]
    assert len(fake_na) == 1 and fake_na[0].split()[-1] == "ok"
    assert len(fake_rowscore) == 1 and "no: needs a GPU" in fake_rowscore[0]
    assert not [line for line in under["attention"] if "fake_rowscore" in line]


def test_smoke_ops_pass_on_cpu(capsys):
    assert cli.main(["smoke", "--device", "cpu", "--no-models"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(" yes") or line.endswith(" NO")]
    assert len(rows) >= 10 and all(line.endswith(" yes") for line in rows)


@pytest.mark.slow  # the timm model rows run nat_mini / dinat_mini on the CPU reference path (~1 min)
def test_smoke_passes_on_cpu(capsys):
    assert cli.main(["smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(" yes") or line.endswith(" NO")]
    assert len(rows) >= 13 and all(line.endswith(" yes") for line in rows)
    assert "timm nat_mini" in out and "timm dinat_mini" in out
    assert "0 failed" in out


def test_smoke_reports_a_wrong_kernel(monkeypatch, capsys):
    """A backend that is off by a small amount must turn the smoke red (the oracle is independent)."""
    exact = reference.na

    def off_by_a_bit(*args, **kwargs):
        return exact(*args, **kwargs) + 1e-3

    monkeypatch.setattr(reference, "na", off_by_a_bit)
    assert cli.main(["smoke", "--device", "cpu", "--no-models"]) == 1
    out = capsys.readouterr().out
    assert " NO" in out and "na2d k=7 rpb" in out


def test_smoke_photo_is_real():
    photo = smoke.load_photo()
    assert photo.shape == (96, 96, 3)
    assert 0.05 < float(photo.std()) < 0.5  # a photo, not a constant or noise-free test card


def test_every_command_is_listed_and_follows_the_contract():
    help_text = cli.build_parser().format_help()
    expected = {"info", "smoke", "check", "bench", "bench-attn", "bench-bra", "bench-agent", "bench-prune",
                "bench-prune-kernels", "report"}
    assert {c.name for c in cli.COMMANDS} == expected
    for command in cli.COMMANDS:
        assert command.name in help_text
        add_arguments, run = cli._implementation(command)
        assert callable(run)
        if add_arguments is not None:  # a full command parses its own --help-less arguments through the table
            parser = cli.build_parser(load=command.name)
            assert parser.parse_args([command.name]).func is run


@pytest.mark.parametrize("name", ["bench-prune", "bench-prune-kernels"])
def test_main_only_modules_get_the_rest_of_the_line(name, monkeypatch):
    """A module without add_arguments/run is called as main(argv) with the arguments untouched."""
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda module: fake if module == cli._BY_NAME[name].module else real_import(module))
    assert cli.main([name, "--tiny", "--out", "x.json"]) == 0
    assert calls == [["--tiny", "--out", "x.json"]]


def test_gpu_commands_say_so_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name in ("bench-bra", "check"):
        assert cli.main([name]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().out


def test_check_draw_can_be_narrowed_to_one_code_path():
    """visattn check --dtypes/--rpb: every drawn problem has the asked dtype and bias setting (used to re-check
    the 16-bit rpb path after a fix), and the default draw still mixes all of them."""
    import random

    from visattn.bench import check

    rng = random.Random(0)
    narrow = [check.draw_problem(r, rng, i, check.draw_flags(r, rng, ("bfloat16",), "on"))
              for r in (1, 2, 3) for i in range(30)]
    assert {p["dtype"] for p in narrow} == {"bfloat16"} and all(p["rpb"] for p in narrow)
    assert all(p["stride"] == [1] * p["rank"] for p in narrow if p["op"] == "na")  # rpb excludes stride > 1
    mixed = [check.draw_flags(2, rng) for _ in range(200)]
    assert {f["dtype"] for f in mixed} == set(check.DTYPES) and {f["rpb"] for f in mixed} == {True, False}
