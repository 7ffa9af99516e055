"""visattn.nn modules take timm's / torch's ``device=`` / ``dtype=`` factory keywords and are leaves of timm's FX
tracing (registered when ``import visattn`` loads the model families)."""

import pytest
import torch

import visattn  # noqa: F401  (registers the FX leaves)
from visattn.nn import (
    AgentAttention,
    BiLevelRoutingAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
    RadialAttention,
    SlidingTileAttention,
    VMoBAAttention,
    WindowAttention,
)

CASES = [  # (class, constructor args, input shape)
    (NeighborhoodAttention1D, (16, 2, 3), (2, 9, 16)),
    (NeighborhoodAttention2D, (16, 2, 3), (2, 6, 7, 16)),
    (NeighborhoodAttention3D, (16, 2, 3), (1, 4, 5, 3, 16)),
    (WindowAttention, (16, 4, 2), (2, 8, 8, 16)),
    (AgentAttention, (16, 8, 2), (2, 8, 8, 16)),
    (BiLevelRoutingAttention, (16, 2, 2), (2, 8, 8, 16)),
    (SlidingTileAttention, (16, 2, (1, 2, 2), (1, 3, 3)), (1, 2, 6, 6, 16)),
    (RadialAttention, (16, 2, 4, 0.5), (1, 4, 2, 4, 16)),
    (VMoBAAttention, (16, 2, (2, 2)), (1, 3, 4, 4, 16)),
]


@pytest.mark.parametrize("cls,args,shape", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_factory_keywords(cls, args, shape):
    meta = cls(*args, device="meta", dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in [*meta.parameters(), *meta.buffers()] if t.is_floating_point()} == {
        ("meta", torch.bfloat16)}
    torch.manual_seed(0)
    doubled = cls(*args, dtype=torch.float64)
    torch.manual_seed(0)
    reference = cls(*args).double()  # same initialisation, cast by hand
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(doubled(x), reference(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="dtype"):
        cls(*args, dtype=torch.int64)


@pytest.mark.parametrize("cls,args,shape", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_fx_leaf_in_a_traced_network(cls, args, shape):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torch.fx import Tracer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(args[0])
            self.attn = cls(*args)

        def forward(self, x):
            return self.attn(self.norm(x)) + x

    torch.manual_seed(0)
    net = Net().eval()
    tracer = Tracer(autowrap_functions=tuple(get_notrace_functions()))
    tracer.is_leaf_module = lambda m, name: type(m) in get_notrace_modules() or Tracer.is_leaf_module(tracer, m, name)
    traced = torch.fx.GraphModule(net, tracer.trace(net))
    assert any(n.op == "call_module" and n.target == "attn" for n in traced.graph.nodes)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=0, atol=0)
