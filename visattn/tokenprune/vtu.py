"""DyMU's virtual token unmerging (VTU) as pure tensor arithmetic (no transformers import).

The language model keeps the merged (shorter) sequence of ``Lm`` tokens, but every attention behaves as for the
full, unmerged sequence of ``Lf`` tokens (Wang et al., 2025, arXiv 2504.17040, "virtual token unmerging"). A merge
map ``index`` (B, Lf) names, for each full position, the merged token that stands for it (a text token stands for
itself; a merged visual token for every original patch it absorbed). One attention of the exact form:

1. ``q, k, v`` of the merged tokens (B, H, Lm, d) are expanded to the full sequence by ``index`` (:func:`unmerge`);
2. RoPE rotates ``q`` and ``k`` at the full sequence's positions (``cos``, ``sin``: (B, Lf, d));
3. causal attention over the full sequence, padding keys (``ok`` False) masked out (``ok=None``: no padding);
4. the output is re-merged: each merged token gets the mean of the outputs at the full positions it stands for
   (:func:`remerge_mean`).

Norms, MLPs and the q/k/v/o projections run on the merged tokens only (they act per token, so projecting before or
after the expansion is the same). :func:`virtual_attention_rope_linear` computes the same attention in the paper's
RoPE-linear (cos / sin) form, without expanding q, k, v; :data:`FORMS` names both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``store(k_full, v_full) -> (k, v)``: where the expanded, rotated keys and values go (a KV cache update)
Store = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def unmerge(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Expand ``x`` (B, H, Lm, d) to the full sequence: ``out[:, :, i] = x[:, :, index[:, i]]`` ((B, H, Lf, d))."""
    b, h, _, d = x.shape
    idx = index[:, None, :, None].expand(b, h, index.shape[1], d)
    return x.gather(2, idx)


def remerge_mean(y: torch.Tensor, index: torch.Tensor, ok: torch.Tensor | None, length: int) -> torch.Tensor:
    """Average ``y`` (B, H, Lf, d) over the full positions of each merged token: (B, H, ``length``, d). Only the
    positions with ``ok`` (B, Lf; None: all) count; a merged token without any (padding) gets zeros."""
    b, h, _, d = y.shape
    w = y.new_ones(index.shape) if ok is None else ok.to(y.dtype)
    idx = index[:, None, :, None].expand(b, h, index.shape[1], d)
    total = y.new_zeros(b, h, length, d).scatter_add_(2, idx, y * w[:, None, :, None])
    count = y.new_zeros(b, length).scatter_add_(1, index, w).clamp_(min=1)
    return total / count[:, None, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout (Llama's): ``x * cos + [-x2, x1] * sin``; ``cos``/``sin`` (B, L, d)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """Causal attention of ``q`` (B, H, L, d) over ``k``, ``v`` (B, Hkv, L, d) (grouped heads repeated), keys
    with ``ok`` (B, L) False masked out (None: SDPA's own causal mask); a padding query row sees only itself (no
    NaN)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if ok is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(ok), scale=scaling)


def causal_mask(ok: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: query ``i`` attends key ``j <= i`` where ``ok`` (B, L); every query sees itself (a padding
    row then has one key, so no NaN)."""
    ar = torch.arange(ok.shape[1], device=ok.device)
    allowed = (ar[None, :] <= ar[:, None])[None] & ok[:, None, :]
    return (allowed | (ar[None, :] == ar[:, None])[None])[:, None]


def virtual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                      ok: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, scaling: float,
                      store: Store | None = None) -> torch.Tensor:
    """One attention of VTU, the exact form (module docstring): ``q`` (B, H, Lm, d), ``k``, ``v`` (B, Hkv, Lm, d)
    of the merged tokens, un-rotated; ``index`` (B, Lf) the merge map; ``ok`` (B, Lf) the real full positions
    (None: all); ``cos``, ``sin`` (B, Lf, d) RoPE at the full positions. ``store`` receives the expanded, rotated
    keys and the expanded values (B, Hkv, Lf, d) before the attention (a prefill's KV-cache update) and returns the
    keys and values to attend. Returns the re-merged output (B, H, Lm, d)."""
    kf, vf = rotate(unmerge(k, index), cos, sin), unmerge(v, index)
    if store is not None:
        kf, vf = store(kf, vf)
    out = causal_attention(rotate(unmerge(q, index), cos, sin), kf, vf, ok, scaling)
    return remerge_mean(out, index, ok, q.shape[2])


def _gqa(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], 1) if x.shape[1] != heads else x


def virtual_attention_rope_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                                  ok: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, scaling: float,
                                  store: Store | None = None) -> torch.Tensor:
    """The same attention as :func:`virtual_attention` in the paper's RoPE-linear form: no full-length query, key
    or value is formed for the attention. Per rotary pair ``(x1, x2)`` of dimension ``t`` and angles ``a`` (query
    position ``i``) and ``b`` (key position ``j``), ``rope(q, a) . rope(k, b) = (q1 k1 + q2 k2) cos(a - b) +
    (q1 k2 - q2 k1) sin(a - b)``, with ``cos(a - b) = C_i C_j + S_i S_j`` and ``sin(a - b) = S_i C_j - C_i S_j``:
    the two per-pair products are taken between the merged tokens only ((B, H, Lm, Lm, d/2)), and the merge map
    enters as the sparse (Lf, Lm) expansion weighted by each full position's cos / sin. The output side is
    re-merged before the values: ``G A M v`` (``A M``: each row's attention summed per merged key, ``G``: the mean
    over the rows of each merged query), so the values stay at length ``Lm``. Memory grows as ``Lm^2 d`` per head
    (the exact form's as ``Lf d`` with a fused attention kernel): a second formulation, for checking. ``store``
    (a prefill's KV cache) still receives the expanded, rotated keys and values (decode attends to them)."""
    if store is not None:
        store(rotate(unmerge(k, index), cos, sin), unmerge(v, index))
    heads, half = q.shape[1], q.shape[-1] // 2
    k, v = _gqa(k, heads), _gqa(v, heads)
    q1, q2, k1, k2 = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    same = q1[:, :, :, None] * k1[:, :, None] + q2[:, :, :, None] * k2[:, :, None]  # (B, H, Lm, Lm, d/2)
    cross = q1[:, :, :, None] * k2[:, :, None] - q2[:, :, :, None] * k1[:, :, None]
    b, lf, lm = index.shape[0], index.shape[1], q.shape[2]
    onehot = torch.zeros(b, lf, lm, dtype=q.dtype, device=q.device).scatter_(2, index[..., None], 1.0)
    c, s = cos[..., :half], sin[..., :half]  # (B, Lf, d/2): RoPE repeats the angles over the two halves
    cm, sm = onehot[..., None] * c[:, :, None], onehot[..., None] * s[:, :, None]  # (B, Lf, Lm, d/2)

    def expand(left: torch.Tensor, prod: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bird,bhrsd,bjsd->bhij", left, prod, right)

    scores = (expand(cm, same, cm) + expand(sm, same, sm) + expand(sm, cross, cm) - expand(cm, cross, sm)) * scaling
    real = torch.ones_like(index, dtype=torch.bool) if ok is None else ok
    attn = scores.masked_fill(~causal_mask(real), float("-inf")).softmax(-1)
    per_key = attn @ onehot[:, None]  # (B, H, Lf, Lm): A M
    return remerge_mean(per_key, index, ok, lm) @ v  # (G A M) v


#: DyMU's ``vtu_form`` -> the attention of that form
FORMS: dict[str, Callable[..., torch.Tensor]] = {"exact": virtual_attention,
                                                  "rope_linear": virtual_attention_rope_linear}
