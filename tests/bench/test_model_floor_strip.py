"""`benchmarks/model_floor.py`'s attention-free floor on the CPU: stripping a NAT model leaves no neighborhood
attention call (the packed path included, which never reaches a module's ``_op``), and each stripped block computes
``proj(value slice of qkv(x))``, checked against that product written out by hand."""

import sys
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_strip_attention_removes_every_attention_call(monkeypatch):
    import model_floor

    import visattn.models  # noqa: F401  (registers nat_*)
    from visattn import functional
    from visattn.nn.neighborhood import _NeighborhoodAttention

    calls = []
    for name in ("_na_packed", "na2d"):
        real = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    torch.manual_seed(0)
    model = timm.create_model("nat_mini", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    assert calls, "the unstripped model must reach the attention (else this test cannot fail)"
    calls.clear()
    stripped = model_floor.strip_attention(model)
    assert stripped == sum(isinstance(m, _NeighborhoodAttention) for m in model.modules())
    model(x).sum().backward()
    assert calls == []

    block = next(m for m in model.modules() if isinstance(m, _NeighborhoodAttention))
    tokens = torch.randn(2, 5, 6, block.embed_dim)
    value = (tokens @ block.qkv.weight.T + block.qkv.bias).view(2, 5, 6, 3, -1)[..., 2, :]
    want = value @ block.proj.weight.T + block.proj.bias
    torch.testing.assert_close(block(tokens), want)
