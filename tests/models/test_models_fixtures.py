"""NAT / DiNAT / BiFormer against float64 fixtures saved before their attention moved onto ``visattn.nn``
(tests/models/model_fixtures.py wrote them): every registered entrypoint's tiny configuration must keep the same
state-dict keys and shapes, load the saved weights strictly, and give the saved output and stage maps."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import CONFIGS, FIXTURE_DIR, build, run

from visattn.models import biformer, nat


def _load(name: str) -> dict:
    return torch.load(FIXTURE_DIR / f"{name}.pt", weights_only=True)


def test_every_registered_entrypoint_has_a_fixture():
    import timm

    import visattn  # noqa: F401

    registered = set(timm.list_models(["nat_*", "dinat_*", "biformer_*"]))
    assert registered == set(CONFIGS)
    # the folder also holds the Agent families' fixtures (test_agent_fixtures.py): count this family's files only
    mine = [p for p in FIXTURE_DIR.glob("*.pt") if p.stem.startswith(("nat_", "dinat_", "biformer_"))]
    assert {p.stem for p in mine} == registered
    assert sum(p.stat().st_size for p in mine) < 1_000_000


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_reproduces_saved_fixture(name):
    saved = _load(name)
    assert saved["name"] == name and saved["kwargs"] == CONFIGS[name]
    model = build(name, saved["kwargs"])
    state = model.state_dict()
    assert list(state) == list(saved["state_dict"])  # same keys, same order
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in saved["state_dict"].items()}
    # an own-layout state dict passes the checkpoint filter unchanged
    family = biformer if name.startswith("biformer") else nat
    filtered = family.checkpoint_filter_fn(saved["state_dict"], model)
    assert filtered.keys() == saved["state_dict"].keys()
    assert all(filtered[k] is v for k, v in saved["state_dict"].items())
    model.load_state_dict(saved["state_dict"], strict=True)
    output, features = run(model, saved["input"].double())
    torch.testing.assert_close(output, saved["output"], rtol=0, atol=1e-12)
    assert len(features) == len(saved["features"])
    for got, want in zip(features, saved["features"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dinat_mini", "biformer_tiny"])
def test_fixture_output_depends_on_the_attention(name):
    """The fixtures are sensitive to the attention branch: a 1e-6 change of one layer's qkv weights moves the output
    by far more than the 1e-12 tolerance (so a broken attention cannot hide behind small layer scales)."""
    saved = _load(name)
    model = build(name, saved["kwargs"])
    model.load_state_dict(saved["state_dict"], strict=True)
    qkv = next(m for n, m in model.named_modules() if n.endswith("blocks.0.attn")).qkv
    with torch.no_grad():
        next(qkv.parameters()).add_(1e-6)
    output, _ = run(model, saved["input"].double())
    assert (output - saved["output"]).abs().max() > 1e-9
