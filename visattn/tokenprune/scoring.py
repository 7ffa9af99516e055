"""Exact attention scores for a few query rows, without materialising full attention matrices.

Each function recomputes ``q`` only for the rows it needs and ``k`` for all tokens of one layer, then takes a
softmax over the full (masked) row per head, in float32. The model's own attention (SDPA / flash) is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    x_rows = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = _head_view(attn.q_proj(x_rows), head_dim)
    k = _head_view(attn.k_proj(x), head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q.transpose(1, 2)).transpose(1, 2), attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
    cos_r = cos.expand(hidden.shape[0], -1, -1).gather(1, rows[..., None].expand(-1, -1, cos.shape[-1]))
    sin_r = sin.expand(hidden.shape[0], -1, -1).gather(1, rows[..., None].expand(-1, -1, sin.shape[-1]))
    q = apply_rope(q, cos_r, sin_r)
    k = apply_rope(k, cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1))
    ar = torch.arange(hidden.shape[1], device=hidden.device)
    allowed = key_valid[:, None, :] & (ar[None, None, :] <= rows[..., None])
    scale = getattr(attn, "scaling", head_dim**-0.5)
    return row_softmax(q, k, allowed, scale)


def clip_cls_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]-row attention (B, H, S) of an HF CLIP/SigLIP-style encoder layer, plus its keys (B, S, H, D)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    head_dim = attn.head_dim
    q = _head_view(attn.q_proj(x[:, :1]), head_dim)
    k_flat = attn.k_proj(x)
    k = _head_view(k_flat, head_dim)
    scale = getattr(attn, "scale", getattr(attn, "scaling", head_dim**-0.5))
    probs = row_softmax(q, k, None, scale)[:, :, 0]
    return probs, k.transpose(1, 2)


def open_clip_cls_attention(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`clip_cls_attention` for an open_clip ``ResidualAttentionBlock`` (batch-first input
    ``hidden`` (B, S, C), [CLS] at index 0): q for [CLS] and k for all tokens from ``attn.in_proj_weight``."""
    mha = getattr(block, "attn", None)
    if not isinstance(mha, torch.nn.MultiheadAttention) or not hasattr(block, "ln_1"):
        raise ValueError(f"block={type(block).__name__}: expected an open_clip ResidualAttentionBlock "
                         "(nn.MultiheadAttention; custom blocks with qk-norm / scaled-cosine attention are not supported)")
    if not mha._qkv_same_embed_dim or not mha.batch_first:
        raise ValueError(f"block={type(block).__name__}: needs batch_first attention with a packed in_proj_weight")
    x = block.ln_1(hidden)
    dim = x.shape[-1]
    head_dim = dim // mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(x[:, :1], w[:dim], None if b is None else b[:dim])
    k = _head_view(F.linear(x, w[dim : 2 * dim], None if b is None else b[dim : 2 * dim]), head_dim)
    probs = row_softmax(_head_view(q, head_dim), k, None, head_dim**-0.5)[:, :, 0]
    return probs, k.transpose(1, 2)
