"""The video attention modules (SlidingTileAttention, RadialAttention): qkv Linear -> attention -> proj, against
the projections done by hand around the float64 dense masked oracle; constructor checks name the argument."""

import pytest
import torch

from visattn.bench import dense
from visattn.nn import RadialAttention, SlidingTileAttention, VMoBAAttention


def _by_hand(module, x, attend, extra=None):
    b, t, h, w, c = x.shape
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv.view(b, t, h, w, 3, module.num_heads, c // module.num_heads).unbind(-3)
    out = attend(q, k, v, *(extra or (None, None)))
    return out.reshape(b, t, h, w, c) @ module.proj.weight.T + module.proj.bias


@pytest.mark.parametrize("with_text", [False, True])
def test_modules_match_projections_around_dense_oracle(with_text):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 6, 16, dtype=torch.float64)
    extra = (torch.randn(2, 3, 2, 8, dtype=torch.float64), torch.randn(2, 3, 2, 8, dtype=torch.float64))
    extra = extra if with_text else None
    sta = SlidingTileAttention(16, 2, (2, 2, 2), (1, 2, 3), dtype=torch.float64)
    radial = RadialAttention(16, 2, 4, 0.5, attention_sink=False, dtype=torch.float64)
    vmoba = VMoBAAttention(16, 2, (2, 2, 3), dtype=torch.float64)
    for module, attend in (
            (sta, lambda q, k, v, ek, ev: dense.sliding_tile(q, k, v, (2, 2, 2), (1, 2, 3), None, ek, ev)),
            (radial, lambda q, k, v, ek, ev: dense.radial(q, k, v, 4, 0.5, False, None, ek, ev)),
            (vmoba, lambda q, k, v, ek, ev: dense.vmoba(q, k, v, (2, 2, 3), scale=None, extra_k=ek, extra_v=ev))):
        got = module(x, *(extra or ()))
        assert (got - _by_hand(module, x, attend, extra)).abs().max() < 1e-12
    assert set(dict(sta.named_parameters())) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


@pytest.mark.parametrize(("cls", "kwargs", "exc", "name"), [
    (SlidingTileAttention, dict(embed_dim=16, num_heads=3), ValueError, "num_heads"),
    (SlidingTileAttention, dict(embed_dim=16, num_heads=2, tile_size=(2, 2)), ValueError, "tile_size"),
    (SlidingTileAttention, dict(embed_dim=16, num_heads=2, kernel_tiles=0), ValueError, "kernel_tiles"),
    (SlidingTileAttention, dict(embed_dim=16, num_heads=2, backend="flex"), ValueError, "backend"),
    (RadialAttention, dict(embed_dim=16, num_heads=2, block_size=0), ValueError, "block_size"),
    (RadialAttention, dict(embed_dim=16, num_heads=2, decay_factor=-1.0), ValueError, "decay_factor"),
    (RadialAttention, dict(embed_dim=16, num_heads=2, attention_sink="yes"), TypeError, "attention_sink"),
    (RadialAttention, dict(embed_dim=16, num_heads=2, qk_scale=float("nan")), ValueError, "qk_scale"),
    (VMoBAAttention, dict(embed_dim=16, num_heads=2, chunk_size=(1, 2, 3, 4)), ValueError, "chunk_size"),
    (VMoBAAttention, dict(embed_dim=16, num_heads=2, select_mode="top"), ValueError, "select_mode"),
    (VMoBAAttention, dict(embed_dim=16, num_heads=2, threshold=2.0), ValueError, "threshold"),
])
def test_constructor_rejects_bad_argument_naming_it(cls, kwargs, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        cls(**kwargs)


def test_module_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="x must have shape"):
        RadialAttention(16, 2, 4)(torch.randn(1, 4, 4, 16))
