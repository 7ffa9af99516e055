"""The fused row-score kernel against a float64 reference on CUDA: random shapes (LLaVA sizes included), dtypes,
GQA, padding, shared / per-sample rotary tables, non-contiguous inputs; and through a real HF Llama layer."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def reference(q, k, cos, sin, rows, row_ok, key_valid, scale):
    """float64: explicit rotate-half RoPE, one masked softmax per (sample, head, row), averaged over heads and rows."""
    q, k = q.double(), k.double()
    bsz, n_rows, heads, dim = q.shape
    cos, sin = cos.double().expand(bsz, -1, -1), sin.double().expand(bsz, -1, -1)
    half = dim // 2

    def rope(x, c, s):  # x (B, N, H, D); c, s (B, N, D)
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * c[:, :, None] + rot * s[:, :, None]

    idx = rows[..., None].expand(-1, -1, dim)
    qr = rope(q, cos.gather(1, idx), sin.gather(1, idx))
    kr = rope(k, cos, sin).repeat_interleave(heads // k.shape[2], dim=2)
    logits = torch.einsum("brhd,bshd->bhrs", qr, kr) * scale
    ar = torch.arange(k.shape[1], device=k.device)
    allowed = key_valid[:, None, None, :] & (ar[None, None, None, :] <= rows[:, None, :, None])
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
    w = row_ok.double()[:, None, :, None]
    return (probs * w).sum((1, 2)) / (heads * w.sum((1, 2)))


def _problem(seed, bsz, n_rows, heads, kv, dim, seq, dtype, shared, strided):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(bsz, n_rows, heads, dim, generator=g, device="cuda").to(dtype)
    if strided:  # keys as a slice of a fused projection, queries permuted
        k = torch.randn(bsz, seq, kv, 3 * dim, generator=g, device="cuda").to(dtype)[..., dim : 2 * dim]
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        k = torch.randn(bsz, seq, kv, dim, generator=g, device="cuda").to(dtype)
    pos = torch.arange(seq, device="cuda")[None].expand(1 if shared else bsz, -1)
    freqs = pos[..., None].float() * (1e4 ** (-torch.arange(0, dim, 2, device="cuda").float() / dim))
    emb = torch.cat([freqs, freqs], -1)
    rows = torch.randint(seq // 2, seq, (bsz, n_rows), generator=g, device="cuda")
    rows[:, 0] = seq - 1
    row_ok = torch.rand(bsz, n_rows, generator=g, device="cuda") < 0.8
    row_ok[:, 0] = True
    key_valid = torch.rand(bsz, seq, generator=g, device="cuda") < 0.9
    key_valid[:, -1] = True
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype), rows, row_ok, key_valid, dim**-0.5


FIXED = [  # LLaVA-1.5 b8 PDrop/FastV, NeXT b1, SparseVLM raters, GQA head dim 80
    (8, 1, 32, 32, 128, 611, torch.float16, True, False),
    (1, 1, 32, 32, 128, 2955, torch.float16, True, False),
    (2, 40, 32, 32, 128, 700, torch.bfloat16, False, True),
    (3, 7, 12, 4, 80, 333, torch.float32, False, True),
]


def _random(n):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
        kv = pick([1, 2, 4])
        out.append((pick([1, 2, 5]), pick([1, 2, 9, 33, 128]), kv * pick([1, 2, 3]), kv,
                    pick([16, 32, 64, 80, 96, 128]), int(torch.randint(2, 1500, (1,), generator=g)),
                    pick([torch.float16, torch.bfloat16, torch.float32]), pick([True, False]), pick([True, False])))
    return out


TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("case", FIXED + _random(30), ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_kernel_matches_float64(case):
    from visattn.tokenprune.kernels import rowscore_why_not as why_not
    from visattn.tokenprune.kernels.rowscore import row_scores

    args = _problem(sum(map(ord, str(case))), *case)
    assert why_not(args[0], args[1], args[2]) is None
    got = row_scores(*args)
    want = reference(*args)
    assert got.shape == want.shape and torch.isfinite(got).all()
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= TOL[case[6]], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_layer_scores_match_eager(dtype):
    """Through a real (random) HF Llama decoder layer and its rotary embedding: Triton == eager ops."""
    transformers = pytest.importorskip("transformers")
    from visattn import backends
    from visattn.tokenprune import scoring

    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaModel(cfg).to("cuda", dtype).eval()
    hidden = torch.randn(3, 300, 512, device="cuda", dtype=dtype)
    pos = torch.arange(300, device="cuda")[None].expand(3, -1)
    cos, sin = model.rotary_emb(hidden, pos)
    valid = torch.ones(3, 300, dtype=torch.bool, device="cuda")
    valid[1, :20] = False  # a left-padded row
    rows = torch.tensor([[299, 250], [299, 100], [299, 299]], device="cuda")
    row_ok = torch.tensor([[True, True], [True, False], [True, True]], device="cuda")
    got = {}
    for backend in ("triton", "reference"):
        with backends.use_backend(backend, family="tokenprune"), torch.no_grad():
            got[backend] = scoring.decoder_row_scores(model.layers[0], hidden, rows, row_ok, cos, sin, valid)
    err = float((got["triton"] - got["reference"]).abs().max() / got["reference"].abs().max())
    assert err < (5e-3 if dtype == torch.float16 else 3e-2), err
    assert (got["triton"][1, :20] == 0).all()
