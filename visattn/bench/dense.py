"""The dense float64 oracle of every attention op: explicit boolean masks, written straight from docs/SEMANTICS.md.

A second, independent formulation of every op (pairwise conditions over all (query, key) pairs instead of the
reference's neighbour tables), and the only one: ``visattn smoke`` reads it through ``PEERS`` and the tests through
``tests/oracle.py``, which re-exports it next to the test-only helpers. It imports torch and the standard library
only, never visattn, so it can judge every backend (``tests/test_import_rules.py`` checks this). Float64, O(N²):
small inputs only. All tensors are heads-last, ``[B, *spatial, heads, head_dim]``, as in the public API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def as_tuple(value, n: int, name: str = "value") -> tuple:
    """An int/bool, or an n-sequence, as an n-tuple (the public API's per-dimension broadcasting)."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} entries (one per spatial dimension), got {len(value)}")
        return tuple(value)
    return (value,) * n


# ----------------------------------------------------------------------------------------------- masks and biases
def na_mask_1d(length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False) -> Tensor:
    """[L, L] bool: may query i attend key j in one dimension (SEMANTICS.md, neighborhood attention, rules 1-3)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    same_group = (i % dilation) == (j % dilation)
    qi, kj = i // dilation, j // dilation
    group_len = -(-(length - i % dilation) // dilation)
    if causal:
        lead = torch.minimum(qi // stride * stride + stride - 1, group_len - 1)
        inside = (kj <= qi) & (lead - kj < kernel)
    else:
        left, right = kernel // 2, kernel // 2 - (kernel % 2 == 0)
        lead = torch.minimum(qi // stride * stride + stride // 2, group_len - 1)
        centre = lead.clamp(min=left).minimum(group_len - 1 - right)
        inside = (kj >= centre - left) & (kj <= centre + right)
    return same_group & inside


def window_mask_1d(length: int, window: int, shift: int = 0) -> Tensor:
    """[L, L] bool: do positions i and j share the window ``floor((x - shift) / window)``."""
    win = torch.div(torch.arange(length) - shift, window, rounding_mode="floor")
    return win[:, None] == win[None, :]


def _outer_and(masks: Sequence[Tensor]) -> Tensor:
    """Combine per-dimension [L_d, L_d] masks into the [N, N] mask of the row-major flattened grid."""
    full = masks[0]
    for m in masks[1:]:
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(full.shape[0] * m.shape[0], -1)
    return full


def na_mask(shape: Sequence[int], kernel, dilation=1, stride=1, causal=False) -> Tensor:
    """[N, N] bool over the row-major flattened tokens of ``shape``: the product of the per-dimension 1-D masks.
    Each parameter is an int/bool or one value per dimension."""
    n = len(shape)
    params = (as_tuple(a, n, name) for a, name in zip((kernel, dilation, stride, causal),
                                                        ("kernel", "dilation", "stride", "causal"), strict=True))
    return _outer_and([na_mask_1d(length, *p) for length, *p in zip(shape, *params, strict=True)])


def window_mask(shape: Sequence[int], window, shift=0) -> Tensor:
    """[N, N] bool over the row-major flattened tokens of ``shape``: same window in every dimension."""
    n = len(shape)
    sizes, shifts = as_tuple(window, n, "window"), as_tuple(shift, n, "shift")
    return _outer_and([window_mask_1d(*a) for a in zip(shape, sizes, shifts, strict=True)])


def relative_bias(rpb: Tensor, spatial: Sequence[int], divisors: Sequence[int], sizes: Sequence[int]) -> Tensor:
    """[heads, N, N] bias ``rpb[h, (kj - qi) + s - 1, ...]`` with coordinates divided by ``divisors`` (NA's dilation;
    1 for windows). A pair whose offset leaves the table (only ever a masked pair: SEMANTICS.md rejects rpb with
    stride > 1) gets 0. Differentiable in ``rpb``."""
    grids = torch.meshgrid(*[torch.arange(n, device=rpb.device) for n in spatial], indexing="ij")
    coords = [g.reshape(-1) // d for g, d in zip(grids, divisors, strict=True)]
    offs = [c[None, :] - c[:, None] + s - 1 for c, s in zip(coords, sizes, strict=True)]
    inside = torch.stack([(o >= 0) & (o <= 2 * s - 2) for o, s in zip(offs, sizes, strict=True)]).all(0)
    gathered = rpb[(slice(None), *[o.clamp(0, 2 * s - 2) for o, s in zip(offs, sizes, strict=True)])]
    return gathered.masked_fill(~inside, 0.0)


# ----------------------------------------------------------------------------------------------- dense attention
def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, bias: Tensor | None = None,
                    scale: float | None = None, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                    return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Float64 masked softmax attention over flattened tokens.

    q: ``[B, *sp_q, H, D]``, k: ``[B, *sp_k, H, D]``, v: ``[B, *sp_k, H, Dv]`` (N and M tokens once flattened);
    mask: bool ``[N, M]``, ``[B, N, M]`` or ``[B, H, N, M]`` (True = may attend); bias: broadcastable to
    ``[B, H, N, M]``; extra_k / extra_v: ``[B, E, H, D]`` keys every query attends too, unmasked and unbiased, in the
    same softmax. Returns ``[B, *sp_q, H, Dv]`` float64; with ``return_lse`` also the natural-log log-sum-exp of each
    query's logits (masked keys excluded, extra keys and biases included), ``[B, *sp_q, H]``.
    """
    batch, heads = q.shape[0], q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def flat(t):
        return t.to(torch.float64).reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)  # [B, H, tokens, D]

    logits = flat(q) @ flat(k).transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    if mask is not None:
        mask = (mask[None, None] if mask.dim() == 2 else mask[:, None] if mask.dim() == 3 else mask).to(logits.device)
        logits = logits.masked_fill(~mask, float("-inf"))
    values = flat(v)
    if extra_k is not None:
        logits = torch.cat([logits, flat(q) @ flat(extra_k).transpose(-1, -2) * scale], dim=-1)
        values = torch.cat([values, flat(extra_v)], dim=-2)
    out = (torch.softmax(logits, dim=-1) @ values).transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    if return_lse:
        return out, torch.logsumexp(logits, dim=-1).transpose(1, 2).reshape(q.shape[:-1])
    return out


# ----------------------------------------------------------------------------------------------- the ops
def na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
       additional_values=None, *, rpb=None, return_lse=False):
    """Neighborhood attention with NATTEN 0.21's argument names and order (stride before dilation; ints broadcast
    per dimension) plus the keyword-only ``rpb``, as ``visattn.na{1,2,3}d``. With ``return_lse`` returns
    ``(out, lse)``, lse ``[B, *spatial, heads]``."""
    spatial = tuple(q.shape[1:-2])
    n = len(spatial)
    kernel_size, stride, dilation, is_causal = (
        as_tuple(a, n, name) for a, name in ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation"),
                                             (is_causal, "is_causal")))
    mask = na_mask(spatial, kernel_size, dilation, stride, is_causal)
    bias = None if rpb is None else relative_bias(rpb.to(torch.float64), spatial, dilation, kernel_size)
    return dense_attention(q, k, v, mask, bias, scale, additional_keys, additional_values, return_lse)


def window(q, k, v, window_size, shift=0, rpb=None, scale=None):
    """(Shifted) window attention, as ``visattn.window_attention`` (ints broadcast per dimension)."""
    spatial = tuple(q.shape[1:-2])
    window_size = as_tuple(window_size, len(spatial), "window_size")
    mask = window_mask(spatial, window_size, shift)
    bias = None if rpb is None else relative_bias(rpb.to(torch.float64), spatial, [1] * len(spatial), window_size)
    return dense_attention(q, k, v, mask, bias, scale)


def agent(q, k, v, agents, agent_bias=None, query_bias=None, scale=None):
    """Agent attention's two softmaxes (agents <- keys, then queries <- agents), as ``visattn.agent_attention``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads = q.shape[0], q.shape[-2]
    def flat(t):
        return t.double().reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)
    a_logits = flat(agents) @ flat(k).transpose(-1, -2) * scale + (0 if agent_bias is None else agent_bias.double())
    summary = torch.softmax(a_logits, -1) @ flat(v)
    q_logits = flat(q) @ flat(agents).transpose(-1, -2) * scale + (0 if query_bias is None else query_bias.double())
    out = torch.softmax(q_logits, -1) @ summary
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


def bilevel_routing(q, k, v, regions, topk, scale=None, *, routing=None, return_routing=False):
    """Dense-mask BRA: key j is visible to query i iff j's region is among the top-k routed of i's region.

    ``regions`` is ``S`` or ``(Sh, Sw)``. The routing comes from ``torch.topk`` on float64 region affinities unless
    ``routing`` ``[B, R, topk]`` forces it (for a low-precision run that breaks a near-tie differently). With
    ``return_routing`` returns ``(out, routing)``, as ``visattn.bilevel_routing_attention``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, height, width = q.shape[:3]
    sh, sw = as_tuple(regions, 2, "regions")
    ph, pw = -(-height // sh) * sh, -(-width // sw) * sw
    def pad(t):
        return torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, pw - width, 0, ph - height))
    qp, kp, vp = pad(q), pad(k), pad(v)
    rh, rw = ph // sh, pw // sw
    rows, cols = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    region_of = ((rows // rh) * sw + cols // rw).reshape(-1)  # [N]
    n_regions = sh * sw
    if routing is None:
        onehot = torch.nn.functional.one_hot(region_of, n_regions).double()  # [N, R]
        def means(t):
            return (onehot.T @ t.detach().reshape(batch, ph * pw, -1)) / onehot.sum(0)[:, None]
        routing = (means(qp) @ means(kp).transpose(-1, -2)).topk(topk, dim=-1).indices  # affinity [B, R, R]
    routing = routing.to(torch.long)
    routed = torch.zeros(batch, n_regions, n_regions, dtype=torch.bool)
    routed.scatter_(2, routing, True)
    outs = []
    for b in range(batch):
        mask = routed[b][region_of][:, region_of]  # [N, N]
        outs.append(dense_attention(qp[b : b + 1], kp[b : b + 1], vp[b : b + 1], mask, None, scale))
    out = torch.cat(outs)[:, :height, :width]
    return (out, routing) if return_routing else out


def sliding_tile_mask(spatial: Sequence[int], tile_size: Sequence[int], kernel_tiles: Sequence[int]) -> Tensor:
    """[N, N] bool: STA's mask (FastVideo's flex-attention definition): the query's tile, its window centre clamped
    to ``[k // 2, tiles - 1 - k // 2]`` (the upper bound wins when they cross), keys in tiles ``|centre - u| <=
    k // 2`` in every dimension."""
    grids = torch.meshgrid(*[torch.arange(n) for n in spatial], indexing="ij")
    inside = torch.ones(1, 1, dtype=torch.bool)
    for g, n, tile, k in zip(grids, spatial, tile_size, kernel_tiles, strict=True):
        t = g.reshape(-1) // tile
        centre = torch.clamp(t, min=k // 2).clamp(max=n // tile - 1 - k // 2)
        inside = inside & ((centre[:, None] - t[None, :]).abs() <= k // 2)
    return inside


def sliding_tile(q, k, v, tile_size, kernel_tiles, scale=None, extra_k=None, extra_v=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = sliding_tile_mask(q.shape[1:-2], tile_size, kernel_tiles)
    return dense_attention(q, k, v, mask, None, scale, extra_k, extra_v)


def radial_release_mask(frames: int, tokens_per_frame: int, block_size: int = 128, decay_factor: float = 1.0,
                        attention_sink: bool = True, threshold: int | None = None) -> Tensor:
    """Radial Attention's block mask, the released builder's arithmetic step by step (mit-han-lab/radial-attention,
    ``radial_attn/attn_mask.py``: ``gen_log_mask_shrinked``, ``get_window_width``, ``get_diagonal_split_mask``,
    ``shrinkMaskStrict``): a dense token mask per frame pair, padded, shrunk to blocks, OR-ed in. ``threshold`` is
    the split mask's hard-coded 128 (None: ``block_size``, which the release's 128 equals). O(P²) per pair."""
    threshold = block_size if threshold is None else threshold
    per = tokens_per_frame
    total = frames * per
    seq = -(-total // block_size) * block_size
    final = torch.zeros(seq // block_size, seq // block_size, dtype=torch.bool)
    border = total // block_size
    final[border:] = True
    final[:, border:] = True
    rows = torch.arange(per).view(-1, 1)
    cols = torch.arange(per).view(1, -1)
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if j == 0 and attention_sink:
                local = torch.ones(per, per, dtype=torch.bool)
            else:
                if dist <= 1:
                    width = per
                else:
                    decay = 2 ** per.bit_length() / 2 ** dist.bit_length() * decay_factor
                    width = decay if decay >= block_size else block_size
                local = (cols - rows).abs() <= width
                split_decay = 2 ** per.bit_length() / 2 ** dist.bit_length()
                if split_decay < threshold and dist % int(threshold / split_decay) != 0:
                    local = torch.zeros(per, per, dtype=torch.bool)
            rem_r, rem_c = (i * per) % block_size, (j * per) % block_size
            size = ((per - 1) // block_size + 1) * block_size
            padded = torch.zeros(rem_r + size, rem_c + size, dtype=torch.bool)
            padded[rem_r:rem_r + per, rem_c:rem_c + per] = local
            n = padded.shape[0] // block_size  # the release sizes both sides from the row count
            blocks = padded[:n * block_size, :n * block_size].view(n, block_size, n, block_size)
            density = blocks.sum(dim=1) / block_size
            frac = (density > 1 / 3).sum(dim=-1) / ((density > 0).sum(dim=-1) + 1e-9)
            shrunk = frac > 0.6
            r0, c0 = (i * per) // block_size, (j * per) // block_size
            final[r0:r0 + n, c0:c0 + n] |= shrunk
    return final


def radial(q, k, v, block_size=128, decay_factor=1.0, attention_sink=True, scale=None, extra_k=None,
           extra_v=None):
    """Dense-mask Radial Attention over ``[B, T, H, W, heads, D]``: the release's block mask expanded to tokens."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    frames, per = q.shape[1], q.shape[2] * q.shape[3]
    blocks = radial_release_mask(frames, per, block_size, decay_factor, attention_sink)
    n = frames * per
    token_block = torch.arange(n) // block_size
    mask = blocks[token_block][:, token_block]
    return dense_attention(q, k, v, mask, None, scale, extra_k, extra_v)


def vmoba_order(spatial: Sequence[int], chunk: Sequence[int]) -> list[int]:
    """The release's ``process_moba_input`` token order, by explicit loops: row-major token index at each position."""
    frames, height, width = spatial
    if len(chunk) == 1:
        return list(range(frames * height * width))
    if len(chunk) == 2:
        ch, cw = chunk
        return [t * height * width + (pr * ch + y) * width + pc * cw + x for pr in range(height // ch)
                for pc in range(width // cw) for t in range(frames) for y in range(ch) for x in range(cw)]
    ct, ch, cw = chunk
    return [(qt * ct + t) * height * width + (pr * ch + y) * width + pc * cw + x for qt in range(frames // ct)
            for pr in range(height // ch) for pc in range(width // cw) for t in range(ct) for y in range(ch)
            for x in range(cw)]


def _release_threshold(gate: Tensor, own: Tensor, threshold: float, threshold_type: str) -> Tensor:
    """The release's ``_select_threshold_*`` steps on a ``[C, H, S]`` gate (every entry valid)."""
    eps = 1e-6
    dims = {"query_head": (0,), "head_global": (0, 2), "overall": (0, 1, 2)}[threshold_type]
    high, low = gate.amax(dim=dims, keepdim=True), gate.amin(dim=dims, keepdim=True)
    span = torch.where(high - low <= eps, torch.ones_like(high), high - low)
    norm = (gate - low) / span
    self_share = (norm * own).sum(dim=dims, keepdim=True)
    total = norm.sum(dim=dims, keepdim=True)
    remain = (threshold - self_share / (total + eps)).clamp(min=0.0)
    others = norm.clone()
    others[own] = 0.0
    chunks, heads, queries = gate.shape
    picked = torch.zeros_like(own)
    if threshold_type == "query_head":  # one group per (head, query): its chunks
        groups = [((0, h, s), [(c, h, s) for c in range(chunks)]) for h in range(heads) for s in range(queries)]
    elif threshold_type == "head_global":  # one group per head: (chunk, query) pairs
        groups = [((0, h, 0), [(c, h, s) for c in range(chunks) for s in range(queries)]) for h in range(heads)]
    else:  # one group: every entry that is not a query's own chunk
        groups = [((0, 0, 0), [(c, h, s) for c in range(chunks) for h in range(heads) for s in range(queries)
                               if not own[c, h, s]])]
    for index, entries in groups:
        values = [float(others[e]) for e in entries]
        order = sorted(range(len(entries)), key=lambda i: -values[i])
        need, whole = float(remain[index]), float(total[index])
        running, cutoff = 0.0, len(order) - 1
        for position, i in enumerate(order):
            running += values[i]
            if running / (whole + eps) >= need:
                cutoff = position
                break
        for i in order[:cutoff + 1]:
            picked[entries[i]] = True
    return picked | own


def vmoba(q, k, v, chunk, select_mode="threshold", topk=3, threshold=0.25, threshold_type="query_head", scale=None,
          extra_k=None, extra_v=None, return_selection=False):
    """Dense VMoBA over ``[B, T, H, W, heads, D]``: the release's chunk order, mean-key gates and selection
    (``moba_attn_varlen``), each sample on its own, then float64 attention over the selected chunks' keys. With
    ``return_selection`` also the fraction of (query, head, chunk) triples selected."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, frames, height, width, heads, dim = q.shape
    n = frames * height * width
    chunk = tuple(chunk) if isinstance(chunk, (tuple, list)) else (chunk,)
    order = torch.tensor(vmoba_order((frames, height, width), chunk))
    chunk_len = chunk[0] * height * width if len(chunk) == 1 else math.prod(chunk) * (frames if len(chunk) == 2
                                                                                        else 1)
    chunks = -(-n // chunk_len)
    chunk_of = torch.arange(n) // chunk_len
    picks = []
    for b in range(batch):
        qb, kb = (t[b].detach().reshape(n, heads, dim).double()[order] for t in (q, k))
        means = torch.stack([kb[chunk_of == c].mean(dim=0) for c in range(chunks)])  # [C, heads, D]
        gate = torch.einsum("chd,shd->chs", means, qb)
        own = (chunk_of[None, None, :] == torch.arange(chunks)[:, None, None]).expand(chunks, heads, n).clone()
        if select_mode == "topk":
            boosted = gate.clone()
            boosted[own] += 1e9
            picked = torch.zeros_like(own)
            picked.scatter_(0, boosted.topk(min(topk, chunks), dim=0).indices, True)
        else:
            picked = _release_threshold(gate, own, threshold, threshold_type)
        picks.append((picked, own))
    dense_all = not any(bool((p & ~o).any()) for p, o in picks)
    outs = []
    for b, (picked, _) in enumerate(picks):
        qb, kb, vb = (t[b].reshape(n, heads, t.shape[-1]).double()[order] for t in (q, k, v))
        heads_out = []
        for h in range(heads):
            allowed = torch.ones(n, n, dtype=torch.bool) if dense_all else picked[:, h, :].T[:, chunk_of]
            logits = (qb[:, h] @ kb[:, h].T * scale).masked_fill(~allowed, float("-inf"))
            values = vb[:, h]
            if extra_k is not None:
                logits = torch.cat([logits, qb[:, h] @ extra_k[b, :, h].double().T * scale], dim=1)
                values = torch.cat([values, extra_v[b, :, h].double()])
            heads_out.append(torch.softmax(logits, dim=1) @ values)
        out = torch.stack(heads_out, dim=1)  # [N, heads, Dv] in chunk order
        restored = torch.empty_like(out)
        restored[order] = out
        outs.append(restored.reshape(frames, height, width, heads, -1))
    if return_selection:
        fraction = 1.0 if dense_all else sum(float(p.double().mean()) for p, _ in picks) / batch
        return torch.stack(outs), fraction
    return torch.stack(outs)


def halo(q, k, v, block_size, halo_size, rel_h=None, rel_w=None, scale=None):
    """Dense HaloNet attention over the zero-padded key map: key j (padded coordinates) is visible to query i iff
    it lies in the ``b + 2h`` window of i's block; the relative logits ``q_i . (rel_h[.] + rel_w[.])`` are a
    per-(query, key) bias indexed by window position minus position in the query block."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, qw = q.shape[1:3]
    height, width = k.shape[1:3]
    (b0, b1), (h0, h1) = block_size, halo_size
    qb = (qh // (height // b0), qw // (width // b1))
    wins = (b0 + 2 * h0, b1 + 2 * h1)
    def pad(t):
        return torch.nn.functional.pad(t.double(), (0, 0, 0, 0, h1, h1, h0, h0))
    kp, vp = pad(k), pad(v)
    dims = []  # per dimension: [queries, padded keys] visibility and table row
    for qlen, klen, b, w, n in zip((qh, qw), (height, width), (b0, b1), wins, qb, strict=True):
        i = torch.arange(qlen)[:, None]
        j = torch.arange(klen + w - b)[None, :] - (i // n) * b  # position in the query block's window
        dims.append(((j >= 0) & (j < w), (j - i % n + w - 1).clamp(0, 2 * w - 2)))
    mask = _outer_and([d[0] for d in dims])
    bias = None
    if rel_h is not None:
        qd = q.double()
        rows = torch.einsum("bxyhd,xjd->bhxyj", qd, rel_h.double()[dims[0][1]])
        cols = torch.einsum("bxyhd,yjd->bhxyj", qd, rel_w.double()[dims[1][1]])
        bias = (rows[..., :, None] + cols[..., None, :]).reshape(q.shape[0], q.shape[-2], qh * qw, -1)
    return dense_attention(q, kp, vp, mask, bias, scale)


# The dense oracle of each op, by its canonical key (``visattn.functional.OP_SPECS``; a test checks they match).
PEERS = {"na": na, "window": window, "agent": agent, "bilevel_routing": bilevel_routing,
         "sliding_tile": sliding_tile, "radial": radial, "vmoba": vmoba, "halo": halo}


def max_abs_error(out: Tensor, oracle: Tensor) -> float:
    return float((out.double().cpu() - oracle.cpu()).abs().max())

