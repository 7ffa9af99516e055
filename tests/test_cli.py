"""The command line: info reports backends, smoke passes on the bundled photo and fails loudly when wrong."""

import pytest

from visattn import cli, reference
from visattn.bench import smoke


def test_info_lists_every_op_and_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("na", "window", "agent", "bilevel_routing"):
        assert op in out
    assert "reference  ok" in out
    assert "torch" in out and "triton" in out


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

    def off_by_a_bit(*args):
        return exact(*args) + 1e-3

    monkeypatch.setattr(reference, "na", off_by_a_bit)
    assert cli.main(["smoke", "--device", "cpu", "--no-models"]) == 1
    out = capsys.readouterr().out
    assert " NO" in out and "na2d k=7 rpb" in out


def test_smoke_photo_is_real():
    photo = smoke.load_photo()
    assert photo.shape == (96, 96, 3)
    assert 0.05 < float(photo.std()) < 0.5  # a photo, not a constant or noise-free test card


@pytest.mark.parametrize("name", ["bench", "bench-attn", "bench-prune", "check"])
def test_delegated_commands_forward_their_arguments(name, monkeypatch):
    """`visattn NAME ARGS` calls NAME's module main(ARGS) untouched, importing it only then."""
    import importlib
    import types

    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(importlib, "import_module", lambda module: fake)
    assert cli.main([name, "--tiny", "--out", "x.json"]) == 0
    assert calls == [["--tiny", "--out", "x.json"]]
    assert name in cli.build_parser().format_help()


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
