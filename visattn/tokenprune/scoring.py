"""Exact attention scores for a few query rows, without materialising full attention matrices.

Each function recomputes ``q`` only for the rows it needs and ``k`` for all tokens of one layer, then takes a
softmax over the full (masked) row per head, in float32. The model's own attention (SDPA / flash) is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visattn.tokenprune import kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding; ``x`` is (B, H, S, D), ``cos``/``sin`` are (B, S, D)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def row_softmax(
    q: torch.Tensor, k: torch.Tensor, key_allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Softmax rows for ``q`` (B, H, R, D) over ``k`` (B, Hkv, S, D); ``key_allowed`` is (B, R, S) or (B, S)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
    logits = torch.einsum("bhrd,bhsd->bhrs", q.float(), k.float()) * scale
    if key_allowed is not None:
        allowed = key_allowed if key_allowed.dim() == 3 else key_allowed[:, None, :]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def _head_view(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


#: HF norms whose forward is ``weight * (x * rsqrt(mean(x²) + eps)).to(dtype)`` computed in float32
_LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm",
                    "Qwen3RMSNorm"}


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a Llama-style RMSNorm in 2 ops (fused normalisation, then the weight, rounded as HF
    rounds); any other norm module is called as is."""
    if type(norm).__name__ in _LLAMA_RMS_NORMS:
        return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)
    return norm(x)


def _decoder_qk(layer: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor):
    """Raw (un-roped) query projections (B, R, H, D) of ``rows`` and keys (B, S, Hkv, D) of a Llama-family layer."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = _rms_norm(layer.input_layernorm, hidden)
    x_rows = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(x_rows).unflatten(-1, (-1, head_dim))
    k = attn.k_proj(x).unflatten(-1, (-1, head_dim))
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, getattr(attn, "scaling", head_dim**-0.5)


def decoder_keys(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary-embedded keys (B, S, Hkv, D) of a Llama-family decoder ``layer`` for its input ``hidden`` (the key
    states its attention computes, before any head repetition)."""
    attn = layer.self_attn
    k = attn.k_proj(_rms_norm(layer.input_layernorm, hidden)).unflatten(-1, (-1, attn.head_dim))
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    return apply_rope(k.transpose(1, 2), cos.expand(k.shape[0], -1, -1), sin.expand(k.shape[0], -1, -1)).transpose(1, 2)


def decoder_attention_rows(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities (B, H, R, S) of decoder ``layer`` for query ``rows`` (B, R) of its input ``hidden``.

    Works for Llama-family layers (``input_layernorm``, ``self_attn.{q,k}_proj``, optional ``q_norm``/``k_norm``).
    Keys are restricted to ``key_valid`` (B, S) and causally to positions ``<=`` the query row.
    """
    q, k, scale = _decoder_qk(layer, hidden, rows)
    return eager_row_probs(q, k, cos, sin, rows, key_valid, scale)


def eager_row_probs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
                    key_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities (B, H, R, S) of query ``rows`` (B, R) by eager torch ops: RoPE on the raw queries
    (B, R, H, D) and keys (B, S, Hkv, D), keys restricted to ``key_valid`` and causally to positions ``<=`` the row
    (the arithmetic the ``tokenprune.rowscore`` kernel fuses; ``visattn bench-prune-kernels`` times it)."""
    bsz = q.shape[0]
    cos, sin = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    cos_r = cos.gather(1, rows[..., None].expand(-1, -1, cos.shape[-1]))
    sin_r = sin.gather(1, rows[..., None].expand(-1, -1, sin.shape[-1]))
    q = apply_rope(q.transpose(1, 2), cos_r, sin_r)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    ar = torch.arange(k.shape[2], device=k.device)
    allowed = key_valid[:, None, :] & (ar[None, None, :] <= rows[..., None])
    return row_softmax(q, k, allowed, scale)


def decoder_row_scores(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    row_ok: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """How much the ``row_ok`` query ``rows`` (B, R) of decoder ``layer`` attend to each key: the attention
    probabilities averaged over heads and over those rows, (B, S) float32 (same masking as
    :func:`decoder_attention_rows`). Where the ``tokenprune.rowscore`` kernel can run (CUDA, triton importable; see
    ``visattn.backends``, family "tokenprune") one fused Triton launch does the RoPE, logits, softmax and averaging;
    elsewhere, or under the "reference" backend, the eager ops run."""
    q, k, scale = _decoder_qk(layer, hidden, rows)
    if kernels.runs("tokenprune.rowscore", lambda: kernels.rowscore_why_not(q, k, cos)):
        return kernels.row_scores(q, k, cos, sin, rows, row_ok, key_valid, scale)
    probs = eager_row_probs(q, k, cos, sin, rows, key_valid, scale).mean(1)
    w = row_ok.to(probs.dtype)[..., None]
    return (probs * w).sum(1) / w.sum(1).clamp(min=1)


def decoder_attention_mass(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor,
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass every key of decoder ``layer`` receives from all valid query rows of its input ``hidden``
    (B, S, C), heads averaged: ``(mass (B, S), queries (B, S))`` in float32, where ``mass[b, j] = Σ_i mean_h
    A[b, h, i, j]`` over the valid rows ``i`` (causal, keys restricted to ``key_valid`` (B, S)) and ``queries[b,
    j]`` is how many valid rows see key ``j`` (the valid rows ``i ≥ j``; 0 for a padding key). The query rows
    run in chunks of at most ``max_elements`` attention probabilities (B · H · rows · S), so no (S, S) matrix
    per head is held at once. Same masking and RoPE as :func:`decoder_attention_rows`; eager ops only."""
    bsz, length = key_valid.shape
    rows = torch.arange(length, device=hidden.device).expand(bsz, -1)
    q, k, scale = _decoder_qk(layer, hidden, rows)
    cos, sin = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, S, D)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    heads = q.shape[1]
    chunk = max(1, max_elements // max(1, bsz * heads * length))
    ar = torch.arange(length, device=hidden.device)
    mass = torch.zeros(bsz, length, device=hidden.device, dtype=torch.float32)
    for lo in range(0, length, chunk):
        r = ar[lo : lo + chunk]
        allowed = key_valid[:, None, :] & (ar[None, None, :] <= r[None, :, None])  # (B, R, S)
        probs = row_softmax(q[:, :, lo : lo + chunk], k, allowed, scale).mean(1)  # (B, R, S)
        probs = torch.where(key_valid[:, lo : lo + chunk, None], probs, 0.0)  # padding rows (NaN or not) add 0
        mass += probs.sum(1)
    seen = key_valid.flip(1).long().cumsum(1).flip(1) * key_valid  # valid rows i >= j, for valid keys j
    return mass, seen.to(torch.float32)


def _hf_scale(attn: torch.nn.Module) -> float:
    """Softmax scale of an HF attention module (``scale`` in CLIP, ``scaling`` elsewhere)."""
    return getattr(attn, "scale", getattr(attn, "scaling", attn.head_dim**-0.5))


def _open_clip_mha(block: torch.nn.Module, arg: str, expected: str) -> torch.nn.MultiheadAttention:
    """The packed, batch-first ``nn.MultiheadAttention`` of an open_clip block, or a ValueError naming ``arg``."""
    mha = getattr(block, "attn", None)
    if not isinstance(mha, torch.nn.MultiheadAttention) or not hasattr(block, "ln_1"):
        raise ValueError(f"{arg}={type(block).__name__}: expected {expected} (nn.MultiheadAttention; custom blocks "
                         "with qk-norm / scaled-cosine attention are not supported)")
    if not mha._qkv_same_embed_dim or not mha.batch_first:
        raise ValueError(f"{arg}={type(block).__name__}: needs batch_first attention with a packed in_proj_weight")
    return mha


def clip_cls_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]-row attention (B, H, S) of an HF CLIP/SigLIP-style encoder layer, plus its keys (B, S, H, D)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    head_dim = attn.head_dim
    q = _head_view(attn.q_proj(x[:, :1]), head_dim)
    k_flat = attn.k_proj(x)
    k = _head_view(k_flat, head_dim)
    probs = row_softmax(q, k, None, _hf_scale(attn))[:, :, 0]
    return probs, k.transpose(1, 2)


def open_clip_cls_attention(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`clip_cls_attention` for an open_clip ``ResidualAttentionBlock`` (batch-first input
    ``hidden`` (B, S, C), [CLS] at index 0): q for [CLS] and k for all tokens from ``attn.in_proj_weight``."""
    mha = _open_clip_mha(block, "block", "an open_clip ResidualAttentionBlock")
    x = block.ln_1(hidden)
    dim = x.shape[-1]
    head_dim = dim // mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(x[:, :1], w[:dim], None if b is None else b[:dim])
    k = _head_view(F.linear(x, w[dim : 2 * dim], None if b is None else b[dim : 2 * dim]), head_dim)
    probs = row_softmax(_head_view(q, head_dim), k, None, head_dim**-0.5)[:, :, 0]
    return probs, k.transpose(1, 2)


# --------------------------------------------------------------------------- [CLS] rows of many layers at once
@dataclass(frozen=True)
class _ClsWeights:
    """q/k weights of L layers, stacked, with the norm's affine and the attention scale folded in."""

    eps: tuple[float, ...]
    heads: int
    wq: torch.Tensor  # (L, H*D, C): scale * Wq * gamma (per input channel)
    bq: torch.Tensor  # (L, H*D, 1): scale * (Wq @ beta + bq)
    wk_t: torch.Tensor  # (L*H, C, D): (Wk * gamma) per head, transposed


def _cls_spec(layer: torch.nn.Module) -> tuple[torch.nn.Module, tuple, int, float]:
    """(pre-attention norm, raw q/k parameters, heads, scale) of an HF CLIP/SigLIP layer or open_clip block.

    The raw parameters are ``(q_weight, q_bias, k_weight)`` (HF) or ``(in_proj_weight, in_proj_bias)``
    (open_clip, packed q,k,v); they also key the weight cache, so no slicing happens here.
    """
    if hasattr(layer, "layer_norm1") and hasattr(layer, "self_attn"):
        attn = layer.self_attn
        wq = attn.q_proj.weight
        heads = getattr(attn, "num_heads", None) or wq.shape[0] // attn.head_dim
        return layer.layer_norm1, (wq, attn.q_proj.bias, attn.k_proj.weight), int(heads), float(_hf_scale(attn))
    mha = _open_clip_mha(layer, "layer", "an HF CLIP/SigLIP encoder layer or an open_clip ResidualAttentionBlock")
    head_dim = mha.embed_dim // mha.num_heads
    return layer.ln_1, (mha.in_proj_weight, mha.in_proj_bias), mha.num_heads, head_dim**-0.5


def _tensor_key(t: torch.Tensor | None) -> tuple:
    if t is None:
        return ()
    version = -1 if t.is_inference() else t._version  # in-place updates (load_state_dict, copy_) bump it
    return t.data_ptr(), version, t.dtype, t.device, tuple(t.shape)


def _build_weights(specs: list, dtype: torch.dtype, device: torch.device) -> _ClsWeights:
    """Stack and fold the q/k weights of all layers (runs once per cache key)."""
    wqs, bqs, wks = [], [], []
    heads = specs[0][2]
    for norm, raw, _, scale in specs:
        c = norm.normalized_shape[-1]
        if len(raw) == 2:  # open_clip: packed in_proj (q, k, v)
            wq, bq, wk = raw[0][:c], None if raw[1] is None else raw[1][:c], raw[0][c : 2 * c]
        else:
            wq, bq, wk = raw
        wq, wk = wq.to(device, dtype), wk.to(device, dtype)
        bq = torch.zeros(wq.shape[0], device=device, dtype=dtype) if bq is None else bq.to(device, dtype)
        if norm.bias is not None:
            bq = bq + wq @ norm.bias.to(device, dtype)
        if norm.weight is not None:
            gamma = norm.weight.to(device, dtype)
            wq, wk = wq * gamma, wk * gamma
        wqs.append(wq * scale)
        bqs.append(bq * scale)
        wks.append(wk)
    wk = torch.stack(wks)  # (L, H*D, C)
    n_layers, hd, c = wk.shape
    wk_t = wk.view(n_layers * heads, hd // heads, c).transpose(1, 2)
    eps = tuple(float(s[0].eps) for s in specs)
    return _ClsWeights(eps, heads, torch.stack(wqs), torch.stack(bqs)[..., None], wk_t)


def _cls_weights(layers: list, dtype: torch.dtype, device: torch.device, cache: dict | None) -> _ClsWeights | None:
    """Folded weights of ``layers`` (from ``cache`` when its key still matches), or None where the batched path
    does not apply (a norm that is not a LayerNorm over the last dim, or layers with different head counts)."""
    specs = [_cls_spec(layer) for layer in layers]
    if any(not isinstance(s[0], torch.nn.LayerNorm) or len(s[0].normalized_shape) != 1 for s in specs):
        return None
    if len({s[2] for s in specs}) != 1:
        return None
    if cache is None:
        return _build_weights(specs, dtype, device)
    key = (dtype, device, tuple(map(id, layers)),
           tuple((_tensor_key(n.weight), _tensor_key(n.bias), n.eps, *map(_tensor_key, raw), h, sc)
                 for n, raw, h, sc in specs))
    if cache.get("key") != key:
        with torch.no_grad():
            cache["weights"] = _build_weights(specs, dtype, device)
        cache["key"] = key
    return cache["weights"]


def clip_cls_attention_layers(
    layers: Sequence[torch.nn.Module], hiddens: Sequence[torch.Tensor], cache: dict | None = None
) -> torch.Tensor:
    """[CLS]-row attention probabilities (L, B, H, S) of L encoder layers given their inputs ``hiddens``
    (L × (B, S, C)), with a constant number of batched ops (independent of L).

    ``layers`` are HF CLIP/SigLIP-style encoder layers (``layer_norm1``, ``self_attn.{q,k}_proj``) or open_clip
    ``ResidualAttentionBlock``s (``ln_1``, packed ``attn.in_proj_weight``); same result as
    :func:`clip_cls_attention` / :func:`open_clip_cls_attention` per layer, computed in float32 (or float64).

    No key projection is materialised: logit ``s`` of head ``h`` is ``scale * q_h · k_{h,s}`` with
    ``k_{h,s} = Wk_h (gamma * xhat_s + beta) + bk_h``. The part ``q_h · (Wk_h beta + bk_h)`` is the same for
    every key ``s``, so it shifts the whole softmax row by a constant and cancels: the key bias (and the norm's
    beta on the key side) can be dropped. What is left is ``xhat_s · u_h`` with
    ``u_h = scale * (Wk_h * gamma)^T q_h`` (C values per head), so one ``(S, C) @ (C, H)`` product per layer
    replaces the (S, C) @ (C, C) key projection. ``xhat`` is the affine-free layer norm of the input.

    ``cache`` (optional, owned by the caller): keeps the stacked, folded float32 q/k weights (about
    ``2 * L * C * C`` floats) between calls; rebuilt when a parameter changes (pointer, version, dtype, device).
    """
    layers, hiddens = list(layers), list(hiddens)
    dtype = torch.float64 if hiddens[0].dtype == torch.float64 else torch.float32
    w = _cls_weights(layers, dtype, hiddens[0].device, cache)
    if w is None or len({h.device for h in hiddens}) > 1:  # not batchable: per-layer scores
        single = clip_cls_attention if hasattr(layers[0], "layer_norm1") else open_clip_cls_attention
        return torch.stack([single(layer, h)[0] for layer, h in zip(layers, hiddens, strict=False)])
    x = torch.stack(hiddens).to(dtype)  # (L, B, S, C)
    n_layers, bsz, _, c = x.shape
    if len(set(w.eps)) == 1:
        x = F.layer_norm(x, (c,), eps=w.eps[0])
    else:
        x = torch.stack([F.layer_norm(xi, (c,), eps=e) for xi, e in zip(x, w.eps, strict=False)])
    q = torch.baddbmm(w.bq, w.wq, x[:, :, 0].transpose(1, 2))  # (L, H*D, B), scale folded in
    u = torch.bmm(w.wk_t, q.view(n_layers * w.heads, -1, bsz))  # (L*H, C, B)
    u = u.view(n_layers, w.heads, c, bsz).permute(0, 3, 1, 2)  # (L, B, H, C)
    logits = torch.matmul(u, x.transpose(-1, -2))  # (L, B, H, S)
    return torch.softmax(logits, dim=-1)


def cls_attention_captures(layers: Sequence[torch.nn.Module], hiddens: dict, cache: dict | None = None) -> dict:
    """``{idx: layer input}`` (raw captures of fused pruners) → ``{idx: (probs (B, H, S), None)}`` in one batched
    call (:func:`clip_cls_attention_layers`)."""
    idx = list(hiddens)
    probs = clip_cls_attention_layers([layers[i] for i in idx], [hiddens[i] for i in idx], cache)
    return dict(zip(idx, ((p, None) for p in probs.unbind(0)), strict=False))
