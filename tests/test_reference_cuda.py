"""The reference and the auto dispatcher on CUDA tensors agree with the dense float64 oracle."""

import pytest
import torch

import visattn
from visattn.bench import dense

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_every_op_on_cuda_matches_dense_oracle(dtype, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    gen = torch.Generator().manual_seed(3)
    def rand(*s):
        return torch.randn(*s, generator=gen).cuda().to(dtype)
    q, k, v = rand(2, 13, 17, 3, 2, 32).unbind(3)
    def f64(*ts):
        return [t.double().cpu() for t in ts]
    rpb = rand(2, 9, 9)
    checks = [
        (visattn.na2d(q, k, v, 5, dilation=(2, 3), is_causal=(True, False), rpb=rpb, backend=backend),
         dense.na(*f64(q, k, v), 5, dilation=(2, 3), is_causal=(True, False), rpb=rpb.double().cpu())),
        (visattn.na2d(q, k, v, (6, 4), stride=(3, 4), backend=backend),
         dense.na(*f64(q, k, v), (6, 4), stride=(3, 4))),
        (visattn.bilevel_routing_attention(q, k, v, (3, 4), 5, backend=backend),
         dense.bilevel_routing(*f64(q, k, v), (3, 4), 5)),
    ]
    qw, kw, vw = rand(2, 12, 16, 3, 2, 32).unbind(3)
    rpbw = rand(2, 7, 7)
    checks.append((visattn.window_attention(qw, kw, vw, 4, (2, 1), rpb=rpbw, backend=backend),
                   dense.window(*f64(qw, kw, vw), (4, 4), (2, 1), *f64(rpbw))))
    agents = rand(2, 6, 2, 32)
    checks.append((visattn.agent_attention(q, k, v, agents, backend=backend), dense.agent(*f64(q, k, v, agents))))
    for out, oracle in checks:
        assert out.dtype == dtype and out.is_cuda
        assert not torch.isnan(out).any()
        assert dense.max_abs_error(out, oracle) < TOL[dtype]
