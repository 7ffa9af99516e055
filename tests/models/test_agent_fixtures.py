"""Saved float64 fixtures of every registered Agent-Attention family member (Agent-Swin, Agent-PVT, Agent-DeiT).

Each fixture ``tests/models/fixtures/<name>.pt`` holds a tiny configuration's state dict, an input image batch, the
model's output and its ``forward_intermediates`` features, written once by this file run as a script (before the
models were rebuilt on ``visattn.nn``'s modules)::

    PYTHONPATH=$PWD python tests/models/test_agent_fixtures.py --write

The test rebuilds each model from the same configuration, loads the saved state dict (strict: the key set and every
shape must be the saved ones) and asserts the output and the features equal the saved ones. It is the before/after
oracle for refactors that must not change a model's state dict or numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

from visattn.models import agent, agent_deit, agent_pvt

FIXTURES = Path(__file__).parent / "fixtures"

# Tiny configurations of the registered members; each keeps what distinguishes its variant (attn_type, agent_layer)
# and together they cover every attention kind the families build. Two are not released configurations: Agent-Swin
# window blocks on a 14 x 14 map (window 7, the odd block shifted by 3) and Agent-PVT agent blocks with spatially
# reduced keys plus a spatial-reduction 'B' stage.
_SWIN = dict(img_size=32, in_chans=1, embed_dim=2, num_heads=(1, 1, 2, 2), mlp_ratio=1.0, agent_num=(4, 4, 4, 1),
             num_classes=3)
_PVT = dict(img_size=32, in_chans=1, embed_dims=(2, 4, 4, 8), num_heads=(1, 1, 2, 2), mlp_ratios=(1, 1, 1, 1),
            agent_num=(4, 4, 4, 1), num_classes=3)
_DEIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=8, depth=2, num_heads=2, mlp_ratio=1.0, agent_num=4,
             num_classes=3)
CONFIGS: dict[str, tuple[str, dict]] = {
    "agent_swin_t": ("agent_swin_t", dict(_SWIN, depths=(1, 1, 2, 1))),
    "agent_swin_s": ("agent_swin_s", dict(_SWIN, depths=(1, 1, 2, 1))),
    "agent_swin_b": ("agent_swin_b", dict(_SWIN, depths=(1, 1, 3, 1))),
    "agent_swin_t_shifted": ("agent_swin_t", dict(_SWIN, img_size=28, patch_size=2, embed_dim=4, depths=(2, 1),
                                                  num_heads=(1, 2), agent_num=(4, 4), attn_type="BA")),
    "agent_pvt_t": ("agent_pvt_t", dict(_PVT, depths=(1, 1, 1, 1))),
    "agent_pvt_s": ("agent_pvt_s", dict(_PVT, depths=(1, 2, 1, 1))),
    "agent_pvt_m": ("agent_pvt_m", dict(_PVT, depths=(1, 1, 2, 1))),
    "agent_pvt_l": ("agent_pvt_l", dict(_PVT, depths=(1, 2, 2, 1))),
    "agent_pvt_t_sr": ("agent_pvt_t", dict(_PVT, depths=(1, 1, 1, 1), agent_sr_ratios="2211", attn_type="AABA")),
    "agent_deit_t": ("agent_deit_t", dict(_DEIT)),
    "agent_deit_s": ("agent_deit_s", dict(_DEIT)),
    "agent_deit_b": ("agent_deit_b", dict(_DEIT, agent_num=9, agent_layer=1)),
}


FILTERS = {"agent_swin": agent.checkpoint_filter_fn, "agent_pvt": agent_pvt.checkpoint_filter_fn,
           "agent_deit": agent_deit.checkpoint_filter_fn}


def build(name: str) -> torch.nn.Module:
    variant, kwargs = CONFIGS[name]
    return timm.create_model(variant, pretrained=False, **kwargs).double().eval()


def run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        return model(x), list(model.forward_intermediates(x, intermediates_only=True))


def write() -> None:
    """Write every fixture: random (not initial) parameters so every one of them moves the output."""
    FIXTURES.mkdir(exist_ok=True)
    for i, name in enumerate(CONFIGS):
        torch.manual_seed(i)
        model = build(name)
        with torch.no_grad():
            for p in model.state_dict().values():
                if p.is_floating_point():
                    p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(1, model.in_chans, *model.img_size, dtype=torch.float64)
        output, features = run(model, x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(dict(state_dict=state, input=x, output=output, features=features), FIXTURES / f"{name}.pt")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_matches_saved_fixture(name):
    saved = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    model = build(name)
    assert set(model.state_dict()) == set(saved["state_dict"])
    model.load_state_dict(saved["state_dict"], strict=True)  # shapes too
    output, features = run(model, saved["input"])
    torch.testing.assert_close(output, saved["output"], rtol=0, atol=1e-12)
    assert len(features) == len(saved["features"])
    assert len(features) == len(model.feature_info)
    for got, want in zip(features, saved["features"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)



@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_filter_keeps_a_saved_state_dict(name):
    """A state dict already in visattn's layout and the model's size passes the family's filter unchanged."""
    saved = torch.load(FIXTURES / f"{name}.pt", weights_only=True)["state_dict"]
    filtered = FILTERS[CONFIGS[name][0].rsplit("_", 1)[0]](saved, build(name))
    assert list(filtered) == list(saved)
    for key, value in saved.items():
        assert filtered[key].shape == value.shape and torch.equal(filtered[key], value), key


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/models/test_agent_fixtures.py --write")
    write()
