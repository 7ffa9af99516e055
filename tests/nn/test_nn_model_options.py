"""The nn-module options the model families configure: ``pad_to_window`` of the neighborhood modules (NAT/DiNAT)
and ``flat_qkv`` of ``BiLevelRoutingAttention`` (BiFormer), against float64 oracles written here (padding by hand,
the dense masked attention of visattn.bench.dense, the gather-based BRA of tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import bra_oracle
from test_nn_modules import _randomise

from visattn.bench import dense
from visattn.nn import (
    BiLevelRoutingAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)


def _padded_na_oracle(module, x, padded_shape):
    """Zero-pad x at the end of every spatial dim to ``padded_shape``, qkv Linear (padded tokens get its bias), dense
    masked attention over the padded map, proj Linear, crop to x's size."""
    spatial = x.shape[1:-1]
    xp = x.new_zeros(x.shape[0], *padded_shape, x.shape[-1])
    xp[(slice(None), *(slice(0, s) for s in spatial))] = x
    heads, hd = module.num_heads, module.head_dim
    q, k, v = F.linear(xp, module.qkv.weight, module.qkv.bias).unflatten(-1, (3, heads, hd)).unbind(-3)
    out = dense.na(q, k, v, module.kernel_size, module.stride, module.dilation, module.is_causal, module.scale,
                   rpb=module.rpb)
    out = F.linear(out.flatten(-2), module.proj.weight, module.proj.bias)
    return out[(slice(None), *(slice(0, s) for s in spatial))]


@pytest.mark.parametrize("cls,shape,kwargs,padded", [
    (NeighborhoodAttention1D, (2, 5), dict(kernel_size=7, rel_pos_bias=True), (7,)),
    (NeighborhoodAttention2D, (2, 4, 5), dict(kernel_size=3, dilation=2, rel_pos_bias=True), (6, 6)),
    (NeighborhoodAttention2D, (1, 9, 3), dict(kernel_size=(3, 5), rel_pos_bias=True), (9, 5)),  # one dim padded
    (NeighborhoodAttention3D, (1, 2, 6, 3), dict(kernel_size=3, dilation=(1, 1, 2)), (3, 6, 6)),
])
def test_pad_to_window_matches_padded_oracle(cls, shape, kwargs, padded):
    module = cls(12, 2, pad_to_window=True, **kwargs).double()
    _randomise(module)
    x = torch.randn(*shape, 12, dtype=torch.float64, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    want = _padded_na_oracle(module, x, padded)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, module.qkv.bias], g),
                    torch.autograd.grad(want, [x, module.qkv.bias], g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):  # the default refuses the same map
        cls(12, 2, **kwargs).double()(x)


def test_pad_to_window_is_a_no_op_on_large_maps():
    torch.manual_seed(0)
    padded = NeighborhoodAttention2D(12, 2, 3, dilation=2, rel_pos_bias=True, pad_to_window=True).double()
    plain = NeighborhoodAttention2D(12, 2, 3, dilation=2, rel_pos_bias=True).double()
    plain.load_state_dict(padded.state_dict())
    assert set(padded.state_dict()) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    x = torch.randn(2, 6, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(padded(x), plain(x), rtol=0, atol=0)
    assert "pad_to_window=True" in repr(padded)


def test_flat_qkv_layout_and_numbers():
    flat = BiLevelRoutingAttention(24, 3, n_win=3, qk_dim=12, topk=2, side_dwconv=5, auto_pad=True,
                                   flat_qkv=True).double()
    _randomise(flat, seed=1)
    assert isinstance(flat.qkv, torch.nn.Linear) and flat.qkv.out_features == 2 * 12 + 24
    assert set(flat.state_dict()) == {"qkv.weight", "qkv.bias", "wo.weight", "wo.bias", "lepe.weight", "lepe.bias"}
    x = torch.randn(2, 7, 8, 24, dtype=torch.float64)  # padded to 9x9
    q, k, v = flat.qkv(F.pad(x, (0, 0, 0, 1, 0, 2))).split([12, 12, 24], dim=-1)
    attn, _ = bra_oracle(q.unflatten(-1, (3, 4)), k.unflatten(-1, (3, 4)), v.unflatten(-1, (3, 8)), 3, 2,
                         scale=12**-0.5)
    lepe = flat.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    want = flat.wo(attn.flatten(-2) + lepe)[:, :7, :8]
    torch.testing.assert_close(flat(x), want, rtol=1e-10, atol=1e-10)
    # BiFormer's wrapped layout holds the same numbers under qkv.qkv.*
    wrapped = BiLevelRoutingAttention(24, 3, n_win=3, qk_dim=12, topk=2, side_dwconv=5, auto_pad=True).double()
    wrapped.load_state_dict({k.replace("qkv.", "qkv.qkv.", 1) if k.startswith("qkv.") else k: v
                             for k, v in flat.state_dict().items()})
    torch.testing.assert_close(wrapped(x), flat(x), rtol=0, atol=0)
    assert "flat_qkv=True" in repr(flat)


@pytest.mark.parametrize("build,name", [
    (lambda: NeighborhoodAttention2D(16, 2, 3, pad_to_window="yes"), "pad_to_window"),
    (lambda: NeighborhoodAttention1D(16, 2, 3, pad_to_window=1), "pad_to_window"),
    (lambda: BiLevelRoutingAttention(16, 2, n_win=2, flat_qkv=1), "flat_qkv"),
])
def test_option_type_errors_name_the_argument(build, name):
    with pytest.raises(TypeError, match=name):
        build()
