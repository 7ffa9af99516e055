"""The fused row-score kernel (LLM-side pruning scores) equals a float64 brute force, under TRITON_INTERPRET=1."""

import json
import os

import pytest

# batch, rows, query heads, kv heads, head dim, keys, dtype, cos shared across the batch
CASES = [
    (2, 1, 4, 4, 32, 37, "float32", False),
    (1, 3, 4, 2, 80, 70, "float32", True),
    (3, 5, 2, 1, 16, 45, "float16", False),
    (2, 17, 2, 2, 64, 33, "float32", True),
]


def brute_force(q, k, cos, sin, rows, row_ok, key_valid, scale):
    """Independent float64 reference: rotate every vector explicitly, one softmax per (sample, head, row)."""
    import torch

    q, k, cos, sin = (x.double() for x in (q, k, cos, sin))
    bsz, n_rows, heads, dim = q.shape
    seq, n_rep, half = k.shape[1], heads // k.shape[2], dim // 2
    out = torch.zeros(bsz, seq, dtype=torch.float64)

    def rope(x, c, s):  # x (D,), rotate-half convention
        rot = torch.cat([-x[half:], x[:half]])
        return x * c + rot * s

    for b in range(bsz):
        cb, sb = cos[b % cos.shape[0]], sin[b % sin.shape[0]]
        real = [r for r in range(n_rows) if row_ok[b, r]]
        for h in range(heads):
            for r in real:
                t = int(rows[b, r])
                qr = rope(q[b, r, h], cb[t], sb[t])
                logits = torch.full((seq,), float("-inf"), dtype=torch.float64)
                for s in range(seq):
                    if s <= t and key_valid[b, s]:
                        logits[s] = scale * torch.dot(qr, rope(k[b, s, h // n_rep], cb[s], sb[s]))
                out[b] += torch.softmax(logits, 0).nan_to_num() / (heads * len(real))
    return out


def run_cases() -> list[float]:
    import torch

    from visattn.tokenprune.kernels.rowscore import row_scores

    errors = []
    for i, (bsz, n_rows, heads, kv, dim, seq, dtype, shared) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        q = torch.randn(bsz, n_rows, heads, dim, generator=g).to(dt)
        k = torch.randn(bsz, seq, kv, dim + 8, generator=g).to(dt)[..., 4 : 4 + dim]  # non-contiguous keys
        rows_of_cos = 1 if shared else bsz
        pos = torch.arange(seq)[None].expand(rows_of_cos, -1) + torch.randint(0, 5, (rows_of_cos, 1), generator=g)
        freqs = pos[..., None].double() * (1e4 ** (-torch.arange(0, dim, 2).double() / dim))
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(dt), emb.sin().to(dt)
        rows = torch.randint(seq // 2, seq, (bsz, n_rows), generator=g)
        row_ok = torch.rand(bsz, n_rows, generator=g) < 0.7
        row_ok[:, 0] = True
        key_valid = torch.rand(bsz, seq, generator=g) < 0.85
        key_valid[:, 0] = True
        scale = dim**-0.5
        got = row_scores(q, k, cos, sin, rows, row_ok, key_valid, scale).double()
        want = brute_force(q, k, cos, sin, rows, row_ok, key_valid, scale)
        errors.append(float((got - want).abs().max() / want.abs().max()))
    return errors


@pytest.mark.interpret
def test_row_score_kernel_matches_float64_brute_force(interpreted_results):
    errors = interpreted_results["test_rowscore_kernel_interpret"]
    tolerances = [2e-5 if c[6] == "float32" else 5e-3 for c in CASES]
    assert all(e <= tol for e, tol in zip(errors, tolerances, strict=False)), errors


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
