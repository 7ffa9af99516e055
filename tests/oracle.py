"""Brute-force oracle for the visattn attention families, written from docs/SEMANTICS.md only.

Everything here is deliberately naive: masks are built element by element with Python loops, biases are
materialised as dense ``[heads, N_q, N_k]`` tensors, and attention is one dense float64 softmax. Nothing in this
file imports visattn, so it can judge any backend.

All tensors are heads-last, ``[B, *spatial, heads, head_dim]``, as in the public API.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


def as_tuple(value, n):
    """An int/bool or an n-sequence -> an n-tuple."""
    if isinstance(value, (tuple, list)):
        assert len(value) == n
        return tuple(value)
    return (value,) * n


# --------------------------------------------------------------------------------------------------------------
# Neighborhood attention
# --------------------------------------------------------------------------------------------------------------


def na_allowed_1d(i: int, j: int, length: int, kernel: int, dilation: int, stride: int, causal: bool) -> bool:
    """SEMANTICS.md, neighborhood attention, rules 1-3, for one query i and one key j of one dimension."""
    # 1. dilation group
    if i % dilation != j % dilation:
        return False
    qi = i // dilation
    kj = j // dilation
    group_len = math.ceil((length - i % dilation) / dilation)

    # 2. stride leader
    if causal:
        lead = min((qi // stride) * stride + stride - 1, group_len - 1)
    else:
        lead = min((qi // stride) * stride + stride // 2, group_len - 1)

    # 3. window
    if causal:
        return kj <= qi and lead - kj < kernel
    left = kernel // 2
    right = kernel // 2 - (1 if kernel % 2 == 0 else 0)
    centre = min(max(lead, left), group_len - 1 - right)
    return centre - left <= kj <= centre + right


def na_mask_1d(length, kernel, dilation=1, stride=1, causal=False) -> torch.Tensor:
    """Bool ``[length, length]``: entry (i, j) says whether query i may attend key j."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            mask[i, j] = na_allowed_1d(i, j, length, kernel, dilation, stride, causal)
    return mask


def _row_major_coords(shape: Sequence[int]):
    return list(itertools.product(*[range(n) for n in shape]))


def na_mask(shape, kernel, dilation=1, stride=1, causal=False) -> torch.Tensor:
    """Bool ``[N, N]`` over row-major flattened tokens: the product of the per-dimension 1-D masks."""
    n = len(shape)
    kernel, dilation, stride, causal = (as_tuple(a, n) for a in (kernel, dilation, stride, causal))
    per_dim = [na_mask_1d(shape[d], kernel[d], dilation[d], stride[d], causal[d]) for d in range(n)]
    coords = _row_major_coords(shape)
    N = len(coords)
    mask = torch.ones(N, N, dtype=torch.bool)
    for d in range(n):
        idx = torch.tensor([c[d] for c in coords])
        mask &= per_dim[d][idx[:, None], idx[None, :]]
    return mask


def na_rpb_bias(shape, kernel, dilation, rpb: torch.Tensor) -> torch.Tensor:
    """Dense bias ``[heads, N, N]`` from an rpb table ``[heads, 2k0-1, ...]``.

    Bias for (query i, key j) is ``rpb[h, kj0 - qi0 + k0 - 1, ...]`` in dilation-group coordinates. Pairs whose
    offset leaves the table (only ever masked pairs) get 0.
    """
    n = len(shape)
    kernel, dilation = as_tuple(kernel, n), as_tuple(dilation, n)
    coords = _row_major_coords(shape)
    N = len(coords)
    heads = rpb.shape[0]
    bias = torch.zeros(heads, N, N, dtype=rpb.dtype)
    # build index lists, then one gather so that autograd reaches rpb
    qs, ks, idx = [], [], []
    for a, cq in enumerate(coords):
        for b, ck in enumerate(coords):
            offs = []
            for d in range(n):
                off = ck[d] // dilation[d] - cq[d] // dilation[d] + kernel[d] - 1
                if not 0 <= off < 2 * kernel[d] - 1:
                    break
                offs.append(off)
            else:
                qs.append(a)
                ks.append(b)
                idx.append(offs)
    if qs:
        gathered = rpb[(slice(None),) + tuple(torch.tensor(col) for col in zip(*idx, strict=False))]  # [heads, P]
        bias[:, torch.tensor(qs), torch.tensor(ks)] = gathered
    return bias


def dense_attention(q, k, v, mask=None, bias=None, scale=None, extra_k=None, extra_v=None, return_lse=False):
    """Dense masked attention in float64.

    q: [B, N, H, D], k: [B, M, H, D], v: [B, M, H, Dv]; mask: bool [N, M] or [B, N, M] (or [B, H, N, M]);
    bias: [H, N, M] or [B, H, N, M]; extra_k/extra_v: [B, E, H, D] extra unmasked, unbiased keys.
    Returns [B, N, H, Dv] float64; with ``return_lse`` also the natural-log log-sum-exp of every query's logits
    (masked keys excluded, extra keys included), [B, N, H].
    """
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    if mask is not None:
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[:, None]
        logits = logits.masked_fill(~mask, float("-inf"))
    values = v
    if extra_k is not None:
        ek, ev = extra_k.to(torch.float64), extra_v.to(torch.float64)
        logits = torch.cat([logits, torch.einsum("bnhd,behd->bhne", q, ek) * scale], dim=-1)
        values = torch.cat([v, ev], dim=1)
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhnm,bmhd->bnhd", probs, values)
    if return_lse:
        return out, torch.logsumexp(logits, dim=-1).transpose(1, 2)
    return out


def _flatten_spatial(t, n_spatial):
    B = t.shape[0]
    return t.reshape(B, -1, *t.shape[1 + n_spatial:])


def na_oracle(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
              additional_values=None, *, rpb=None, return_lse=False):
    """Neighborhood attention, dense float64, with NATTEN 0.21's argument order (stride before dilation) plus the
    keyword-only ``rpb``. With ``return_lse`` returns ``(out, lse)``, lse ``[B, *spatial, heads]``."""
    n = q.dim() - 3
    shape = tuple(q.shape[1:1 + n])
    mask = na_mask(shape, kernel_size, dilation, stride, is_causal)
    bias = na_rpb_bias(shape, kernel_size, dilation, rpb.to(torch.float64)) if rpb is not None else None
    result = dense_attention(
        _flatten_spatial(q, n), _flatten_spatial(k, n), _flatten_spatial(v, n), mask=mask, bias=bias,
        scale=scale, extra_k=additional_keys, extra_v=additional_values, return_lse=return_lse,
    )
    out, lse = result if return_lse else (result, None)
    out = out.reshape(q.shape[0], *shape, *out.shape[2:])
    if return_lse:
        return out, lse.reshape(q.shape[0], *shape, lse.shape[-1])
    return out


# --------------------------------------------------------------------------------------------------------------
# Window attention
# --------------------------------------------------------------------------------------------------------------


def window_index_1d(x: int, window: int, shift: int) -> int:
    return (x - shift) // window  # Python floor division == floor((x - t) / w)


def window_mask(shape, window, shift=0) -> torch.Tensor:
    n = len(shape)
    window, shift = as_tuple(window, n), as_tuple(shift, n)
    coords = _row_major_coords(shape)
    N = len(coords)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for a, cq in enumerate(coords):
        for b, ck in enumerate(coords):
            mask[a, b] = all(
                window_index_1d(cq[d], window[d], shift[d]) == window_index_1d(ck[d], window[d], shift[d])
                for d in range(n)
            )
    return mask


def window_rpb_bias(shape, window, rpb) -> torch.Tensor:
    """``rpb[h, xj - xi + w - 1, ...]`` for every pair whose offsets fit in the table (others 0)."""
    return na_rpb_bias(shape, window, 1, rpb)


def window_oracle(q, k, v, window_size, shift=0, rpb=None, scale=None):
    n = q.dim() - 3
    shape = tuple(q.shape[1:1 + n])
    mask = window_mask(shape, window_size, shift)
    bias = window_rpb_bias(shape, as_tuple(window_size, n), rpb.to(torch.float64)) if rpb is not None else None
    out = dense_attention(_flatten_spatial(q, n), _flatten_spatial(k, n), _flatten_spatial(v, n), mask=mask,
                          bias=bias, scale=scale)
    return out.reshape(q.shape[0], *shape, *out.shape[2:])


# --------------------------------------------------------------------------------------------------------------
# Agent attention
# --------------------------------------------------------------------------------------------------------------


def agent_oracle(q, k, v, agents, agent_bias=None, query_bias=None, scale=None):
    """Two softmaxes: agents <- keys, then queries <- agents. All in float64."""
    n = q.dim() - 3
    shape = tuple(q.shape[1:1 + n])
    qf, kf, vf = (_flatten_spatial(t, n).to(torch.float64) for t in (q, k, v))  # [B, N, H, D]
    a = agents.to(torch.float64)  # [B, A, H, D]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s1 = torch.einsum("bahd,bnhd->bhan", a, kf) * scale
    if agent_bias is not None:
        s1 = s1 + agent_bias.to(torch.float64)
    va = torch.einsum("bhan,bnhd->bhad", torch.softmax(s1, -1), vf)  # [B, H, A, Dv]
    s2 = torch.einsum("bnhd,bahd->bhna", qf, a) * scale
    if query_bias is not None:
        s2 = s2 + query_bias.to(torch.float64)
    out = torch.einsum("bhna,bhad->bnhd", torch.softmax(s2, -1), va)
    return out.reshape(q.shape[0], *shape, *out.shape[2:])


# --------------------------------------------------------------------------------------------------------------
# Bi-level routing attention (BiFormer)
# --------------------------------------------------------------------------------------------------------------


def bra_oracle(q, k, v, regions, topk, scale=None, routing=None):
    """Gather-based BRA in float64. Returns (out, routing_index [B, R, topk]).

    ``routing`` may be given to force the routed regions (used when a low-precision run may break near-ties
    differently); otherwise it is computed by torch.topk on float64 region affinities.
    """
    B, H, W, heads, D = q.shape
    Dv = v.shape[-1]
    sh, sw = as_tuple(regions, 2)
    Hp, Wp = math.ceil(H / sh) * sh, math.ceil(W / sw) * sw
    rh, rw = Hp // sh, Wp // sw  # region size
    R = sh * sw

    def pad(t):
        t = t.to(torch.float64)
        out = torch.zeros(B, Hp, Wp, *t.shape[3:], dtype=torch.float64)
        out[:, :H, :W] = t
        return out

    qp, kp, vp = pad(q), pad(k), pad(v)

    # token ids of every region (row-major regions, row-major tokens inside)
    region_tokens = []
    for r in range(R):
        r0, c0 = (r // sw) * rh, (r % sw) * rw
        region_tokens.append([(r0 + y) * Wp + (c0 + x) for y in range(rh) for x in range(rw)])
    region_tokens = torch.tensor(region_tokens)  # [R, T]

    qf = qp.reshape(B, Hp * Wp, heads, D)
    kf = kp.reshape(B, Hp * Wp, heads, D)
    vf = vp.reshape(B, Hp * Wp, heads, Dv)

    if routing is None:
        q_reg = torch.stack([qf[:, region_tokens[r]].mean(1).reshape(B, -1) for r in range(R)], 1)  # [B,R,hD]
        k_reg = torch.stack([kf[:, region_tokens[r]].mean(1).reshape(B, -1) for r in range(R)], 1)
        affinity = q_reg @ k_reg.transpose(1, 2)  # [B, R, R]
        routing = torch.topk(affinity, topk, dim=-1).indices
    routing = routing.to(torch.long)

    out = torch.zeros(B, Hp * Wp, heads, Dv, dtype=torch.float64)
    for b in range(B):
        for r in range(R):
            qt = region_tokens[r]
            kt = torch.cat([region_tokens[int(g)] for g in routing[b, r]])
            o = dense_attention(qf[b:b + 1, qt], kf[b:b + 1, kt], vf[b:b + 1, kt], scale=scale)
            out[b, qt] = o[0]
    out = out.reshape(B, Hp, Wp, heads, Dv)[:, :H, :W]
    return out, routing


# --------------------------------------------------------------------------------------------------------------
# Test helpers (input makers and the forward + gradient comparison); still no visattn import
# --------------------------------------------------------------------------------------------------------------


def make_qkv(batch, spatial, heads, head_dim, *, gen, dtype=torch.float64, fused=False, head_dim_v=None):
    """Random q, k, v leaves (requires_grad). ``fused=True`` gives non-contiguous views of one fused qkv tensor,
    the way a QKV Linear output is split: ``qkv.view(B, *sp, 3, heads, D).unbind(-3)``."""
    spatial = tuple(spatial)
    if fused:
        assert head_dim_v is None or head_dim_v == head_dim
        channels = 2 * heads * head_dim
        x = torch.randn(batch, *spatial, channels, generator=gen, dtype=dtype)
        lin = torch.nn.Linear(channels, 3 * heads * head_dim, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=dtype) / channels ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen, dtype=dtype) * 0.1)
        qkv = lin(x).detach().requires_grad_(True)  # the leaf whose views we pass
        q, k, v = qkv.view(batch, *spatial, 3, heads, head_dim).unbind(-3)
        assert not q.is_contiguous()
        return (q, k, v), qkv
    q = torch.randn(batch, *spatial, heads, head_dim, generator=gen, dtype=dtype).requires_grad_(True)
    k = torch.randn(batch, *spatial, heads, head_dim, generator=gen, dtype=dtype).requires_grad_(True)
    v = torch.randn(batch, *spatial, heads, head_dim_v or head_dim, generator=gen, dtype=dtype).requires_grad_(True)
    return (q, k, v), None


def assert_fwd_bwd_match(run_impl, run_oracle, leaves, *, gen, atol=1e-10, rtol=1e-8, what=""):
    """Run both callables (no arguments; they close over ``leaves``), compare outputs, then compare the gradients
    of every leaf under one random cotangent."""
    out = run_impl()
    expected = run_oracle()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} vs oracle {tuple(expected.shape)}"
    torch.testing.assert_close(out.to(torch.float64), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what} fwd: {m}")
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, cot.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(expected, leaves, cot, allow_unused=True)
    for idx, (g, w) in enumerate(zip(got, want, strict=False)):
        assert w is not None, f"{what}: oracle gives no gradient for leaf {idx}"
        assert g is not None, f"{what}: implementation gives no gradient for leaf {idx}"
        torch.testing.assert_close(g.to(torch.float64), w, atol=atol, rtol=rtol,
                                   msg=lambda m, idx=idx: f"{what} grad of leaf {idx}: {m}")
    return out
