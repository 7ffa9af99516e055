"""Where each query looks, on the host: the pieces of a pattern's geometry that the kernels, the reference and the
CPU schedules share, so that each is written once.

* :func:`interval`: the inclusive key interval of one query coordinate along one dimension, for neighborhood
  (kernel / stride / causal) and window (size / shift) attention; the host twin of ``kernels/patterns.py``'s
  ``key_interval`` (``kernels/tables.py`` and ``dense_schedule.py`` build their tables from it).
* :func:`region_grid`, :func:`pad_to_regions`, :func:`route_regions`: BiFormer's region grid and its top-k region
  routing, which the reference, the gather schedule and the fused kernel's entry all use, so every backend routes
  identically.
* :func:`sliding_tile_kernel`: sliding-tile attention's window in tiles as the odd neighbourhood size NATTEN's
  clamped windows use (STA = GNA with stride = tile).
* :func:`radial_block_mask`: Radial Attention's static block mask (the released ``gen_log_mask_shrinked``
  arithmetic, computed per frame pair from interval counts instead of dense per-pair masks).
* :func:`vmoba_layout`, :func:`vmoba_select`: VMoBA's 1-D/2-D/3-D key chunks and each query's chunk choice (top-k
  or threshold over mean-key affinities), shared by the reference and the fused kernel's entry.

It sits at the bottom of the import layers (docs/ARCHITECTURE.md, "Import rules"): it imports only torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def interval(q: int, group_len: int, kernel: int, stride: int, shift: int, causal: bool, window: bool):
    """Inclusive key interval ``(first, last)`` of group coordinate ``q`` along one dimension (``window``: a
    window of size ``kernel`` shifted by ``shift``; else a neighbourhood of size ``kernel`` with ``stride`` and
    ``causal``), the same rule as ``kernels/patterns.py``'s ``key_interval``."""
    if window:
        origin = ((q - shift + kernel) // kernel - 1) * kernel + shift
        return max(origin, 0), min(origin + kernel - 1, group_len - 1)
    if causal:
        lead = min((q // stride) * stride + stride - 1, group_len - 1)
        return max(lead - kernel + 1, 0), q
    lead = min((q // stride) * stride + stride // 2, group_len - 1)
    left = kernel // 2
    right = kernel - 1 - left
    centre = min(max(lead, left), group_len - 1 - right)
    return centre - left, centre + right


def _mean_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def region_grid(height: int, width: int, regions: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padded map size and region size: (padded_h, padded_w, region_h, region_w)."""
    region_h, region_w = -(-height // regions[0]), -(-width // regions[1])
    return region_h * regions[0], region_w * regions[1], region_h, region_w


def route_regions(q: Tensor, k: Tensor, regions: tuple[int, int], topk: int) -> Tensor:
    """BiFormer routing on padded maps [B, Hp, Wp, heads, D]: top-k regions per query region, [B, R, topk]."""
    batch, height, width = q.shape[:3]
    sh, sw = regions

    def region_means(t: Tensor) -> Tensor:
        t = t.detach().reshape(batch, sh, height // sh, sw, width // sw, -1)
        return t.mean(dim=(2, 4), dtype=_mean_dtype(t.dtype)).reshape(batch, sh * sw, -1)  # no fp32 copy

    affinity = region_means(q) @ region_means(k).transpose(-1, -2)
    return torch.topk(affinity, k=topk, dim=-1).indices


def pad_to_regions(t: Tensor, regions: tuple[int, int]) -> Tensor:
    """Zero-pad [B, H, W, heads, D] at the bottom/right so the regions divide it."""
    padded_h, padded_w, _, _ = region_grid(t.shape[1], t.shape[2], regions)
    return F.pad(t, (0, 0, 0, 0, 0, padded_w - t.shape[2], 0, padded_h - t.shape[1]))


def sliding_tile_kernel(kernel_tiles: int, n_tiles: int) -> int:
    """The tiles a sliding-tile window covers along one dimension, as an odd neighbourhood size.

    STA (Zhang et al. 2025, FastVideo's mask) lets a query tile ``t`` attend key tile ``u`` iff
    ``|c - u| <= kernel_tiles // 2`` with the centre ``c = clamp(t, kernel_tiles // 2, n_tiles - 1 -
    kernel_tiles // 2)`` (torch's clamp: the upper bound wins when the bounds cross). That is NATTEN's clamped
    window of ``2 * (kernel_tiles // 2) + 1`` tiles (an even window takes one tile more), capped at ``n_tiles``
    (a window wider than the map covers all of it)."""
    return min(2 * (kernel_tiles // 2) + 1, n_tiles)


def _radial_window(dist: int, tokens_per_frame: int, block_size: int, decay_factor: float) -> float:
    """Released ``get_window_width``: the spatial band half-width between frames ``dist`` apart (Wan and
    HunyuanVideo agree: whole frames for ``dist <= 1``)."""
    if dist <= 1:
        return float(tokens_per_frame)
    decay = 2 ** tokens_per_frame.bit_length() / 2 ** dist.bit_length() * decay_factor
    return decay if decay >= block_size else float(block_size)


def _radial_keeps_pair(dist: int, tokens_per_frame: int, threshold: int) -> bool:
    """Released ``get_diagonal_split_mask``: whether frames ``dist`` apart interact at all (all or nothing)."""
    decay = 2 ** tokens_per_frame.bit_length() / 2 ** dist.bit_length()
    if decay >= threshold:
        return True
    return dist % int(threshold / decay) == 0


def _radial_pair_blocks(tokens_per_frame: int, block_size: int, band: int, row_offset: int,
                        col_offset: int) -> Tensor:
    """Released ``shrinkMaskStrict`` of one frame pair's band mask ``|c - r| <= band`` placed at
    ``(row_offset, col_offset)`` inside a block-aligned window of ``ceil(P / block)`` blocks a side: a block is
    kept when more than 60% of its touched columns are more than a third full. Column counts are interval
    lengths, so no ``P x P`` mask is built. Float32 arithmetic as in the release."""
    per, bs = tokens_per_frame, block_size
    nb = -(-per // bs)
    col = torch.arange(nb * bs) - col_offset  # frame-local key index of every padded column
    first = (torch.arange(nb) * bs - row_offset).clamp(min=0)[:, None]  # frame-local rows of each row block
    last = ((torch.arange(nb) + 1) * bs - row_offset).clamp(max=per)[:, None]  # exclusive
    counts = (torch.minimum(last, col[None, :] + band + 1) - torch.maximum(first, col[None, :] - band)).clamp(min=0)
    counts = torch.where((col >= 0) & (col < per), counts, 0).reshape(nb, nb, bs)
    density = counts / bs  # float32
    touched = (density > 0).sum(dim=-1)
    dense_cols = (density > 1 / 3).sum(dim=-1)
    return dense_cols / (touched + 1e-9) > 0.6


@functools.lru_cache(maxsize=32)
def radial_block_mask(frames: int, tokens_per_frame: int, block_size: int = 128, decay_factor: float = 1.0,
                      attention_sink: bool = True) -> Tensor:
    """Radial Attention's static block mask (Li et al. 2025; mit-han-lab/radial-attention, ``attn_mask.py``,
    ``gen_log_mask_shrinked``) over ``frames * tokens_per_frame`` video tokens, frame-major.

    Returns a CPU bool tensor ``[nb, nb]``, ``nb = ceil(N / block_size)``: query block ``i`` attends key block
    ``j`` iff ``mask[i, j]``. Per frame pair ``(i, j)``, ``dist = |i - j|``: with ``attention_sink`` (Wan) every
    frame attends frame 0 entirely; otherwise the pair's token mask is the band ``|c - r| <= width(dist)`` over
    frame-local indices (``width`` = a whole frame for ``dist <= 1``, else ``max(2**bitlen(P) / 2**bitlen(dist)
    * decay_factor, block_size)``), all of it dropped unless ``dist`` is a multiple of
    ``int(block_size / (2**bitlen(P) / 2**bitlen(dist)))`` where that ratio is below ``block_size``; each pair's
    mask is reduced to blocks by the release's strict rule and OR-ed in. The last partial block row and column
    (``N % block_size != 0``) are dense, as the release marks every block past ``N // block_size``. The release
    hard-codes 128 both as the block size and as the split threshold; here both are ``block_size``.
    """
    per, bs = tokens_per_frame, block_size
    total = frames * per
    nb = -(-total // bs)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    border = total // bs
    mask[border:] = True
    mask[:, border:] = True
    pairs: dict[tuple, Tensor] = {}
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if j == 0 and attention_sink:
                band = per
            elif _radial_keeps_pair(dist, per, bs):
                band = int(_radial_window(dist, per, bs, decay_factor))
            else:
                continue
            key = (min(band, per), (i * per) % bs, (j * per) % bs)
            if key not in pairs:
                pairs[key] = _radial_pair_blocks(per, bs, *key)
            blocks = pairs[key]
            r0, c0 = (i * per) // bs, (j * per) // bs
            mask[r0:r0 + blocks.shape[0], c0:c0 + blocks.shape[1]] |= blocks
    return mask


def vmoba_layout(spatial: tuple[int, int, int], chunk: tuple[int, ...]) -> tuple[Tensor | None, int]:
    """VMoBA's chunk order of a ``(T, H, W)`` video (the release's ``process_moba_input``): ``(perm, chunk_len)``
    where ``perm[i]`` is the row-major token at position ``i`` of the chunk order (None: the identity) and the
    chunks are consecutive runs of ``chunk_len`` positions (the last one shorter for 1-D chunks).

    ``chunk``: ``(c,)`` 1-D, chunks of ``c`` whole frames; ``(ch, cw)`` 2-D, an ``ch x cw`` patch over all frames,
    order ``(patch row, patch col, t, y, x)``; ``(ct, ch, cw)`` 3-D cubes, order ``(cube t, cube y, cube x, t, y,
    x)``. 2-D and 3-D chunks must divide the video."""
    frames, height, width = spatial
    if len(chunk) == 1:
        return None, chunk[0] * height * width
    index = torch.arange(frames * height * width).view(frames, height, width)
    if len(chunk) == 2:
        ch, cw = chunk
        index = index.view(frames, height // ch, ch, width // cw, cw).permute(1, 3, 0, 2, 4)
        return index.reshape(-1), frames * ch * cw
    ct, ch, cw = chunk
    index = index.view(frames // ct, ct, height // ch, ch, width // cw, cw).permute(0, 2, 4, 1, 3, 5)
    return index.reshape(-1), ct * ch * cw


def _normalise(gate: Tensor, valid: Tensor, dims: tuple[int, ...], eps: float = 1e-6) -> Tensor:
    """Min-max normalisation of the valid gate entries over ``dims`` (the release's ``gate_norm``)."""
    high = torch.where(valid, gate, -torch.inf).amax(dim=dims, keepdim=True)
    low = torch.where(valid, gate, torch.inf).amin(dim=dims, keepdim=True)
    span = high - low
    span = torch.where(span <= eps, torch.ones_like(span), span)
    return torch.where(valid, (gate - low) / span, 0.0)


def _threshold_pick(norm: Tensor, own: Tensor, valid: Tensor, threshold: float, eps: float = 1e-6) -> Tensor:
    """The release's threshold rule on ``[G, E]`` rows (each row one normalisation group, E its entries): keep the
    own entries, then the largest others until their share of the row's total reaches
    ``threshold - own share``; the first sorted entry that reaches it is kept too (all when none does)."""
    total = norm.sum(dim=1, keepdim=True)
    remain = (threshold - (norm * own).sum(dim=1, keepdim=True) / (total + eps)).clamp(min=0.0)
    others = torch.where(own | ~valid, 0.0, norm)
    ordered, order = torch.sort(others, dim=1, descending=True)
    reached = ordered.cumsum(dim=1) / (total + eps) >= remain
    cutoff = torch.where(reached.any(dim=1, keepdim=True), reached.float().argmax(dim=1, keepdim=True),
                         norm.shape[1] - 1)
    keep_sorted = torch.arange(norm.shape[1], device=norm.device)[None, :] <= cutoff
    keep = torch.zeros_like(own).scatter(1, order, keep_sorted)
    return valid & (keep | own)


def vmoba_select(q: Tensor, k: Tensor, chunk_len: int, mode: str = "threshold", topk: int = 3,
                 threshold: float = 0.25, scope: str = "query_head") -> Tensor:
    """VMoBA's key-chunk choice (KwaiVGI/VMoBA ``moba_attn_varlen``) for chunk-ordered ``q, k [B, N, heads, D]``:
    ``[B, heads, N, C]`` bool, ``C = ceil(N / chunk_len)``. Not differentiated.

    The gate of query ``s`` and chunk ``c`` is ``q_s · mean(k over c)`` (unscaled; float32, float64 for float64
    inputs); a query always keeps its own chunk. ``mode="topk"``: its own chunk plus the ``topk - 1`` others of
    largest gate (per query and head). ``mode="threshold"``: the gates are min-max normalised over ``scope``
    (``"query_head"``: per query and head over the chunks; ``"head_global"``: per head over all (chunk, query)
    pairs of the sample; ``"overall"``: over all (chunk, head, query) entries of the sample) and the largest other
    entries are kept until, with the own ones, they hold ``threshold`` of the normalised total."""
    batch, n, heads, _ = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_chunks = -(-n // chunk_len)
    chunk_of = torch.arange(n, device=q.device) // chunk_len
    sums = torch.zeros(batch, n_chunks, heads, k.shape[-1], dtype=ct, device=q.device)
    sums.index_add_(1, chunk_of, k.detach().to(ct))
    starts = torch.arange(n_chunks, device=q.device) * chunk_len
    counts = (n - starts).clamp(max=chunk_len).to(ct)  # the last chunk may be shorter (no bincount: no host sync)
    means = sums / counts[None, :, None, None]
    gate = torch.einsum("bchd,bshd->bhsc", means, q.detach().to(ct))  # [B, heads, N, C]
    own = (chunk_of[:, None] == torch.arange(n_chunks, device=q.device)[None, :]).expand(batch, heads, n, n_chunks)
    valid = torch.ones_like(own)
    if mode == "topk":
        boosted = torch.where(own, gate + 1e9, gate)
        picked = torch.zeros_like(own).scatter(3, boosted.topk(min(topk, n_chunks), dim=3).indices, True)
    else:
        picked = _threshold_select(gate, own, valid, threshold, scope)
    # the release attends densely when no query of the call picked a chunk besides its own
    return torch.where((picked & ~own).any(), picked, torch.ones_like(picked))


def _threshold_select(gate: Tensor, own: Tensor, valid: Tensor, threshold: float, scope: str) -> Tensor:
    batch, heads, n, n_chunks = gate.shape
    if scope == "query_head":
        norm = _normalise(gate, valid, (3,))
        flat = lambda t: t.reshape(-1, n_chunks)  # noqa: E731
        shape = gate.shape
    elif scope == "head_global":
        norm = _normalise(gate, valid, (2, 3))
        flat = lambda t: t.reshape(batch * heads, n * n_chunks)  # noqa: E731
        shape = gate.shape
    else:  # "overall"
        norm = _normalise(gate, valid, (1, 2, 3))
        flat = lambda t: t.reshape(batch, heads * n * n_chunks)  # noqa: E731
        shape = gate.shape
    return _threshold_pick(flat(norm), flat(own), flat(valid), threshold).view(shape)


@torch.library.custom_op("visattn::radial_block_mask", mutates_args=())
def _radial_block_mask_op(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float,
                          attention_sink: bool) -> Tensor:
    return radial_block_mask(frames, tokens_per_frame, block_size, decay_factor, attention_sink).clone()


@_radial_block_mask_op.register_fake
def _(frames, tokens_per_frame, block_size, decay_factor, attention_sink):
    blocks = -(-frames * tokens_per_frame // block_size)
    return torch.empty(blocks, blocks, dtype=torch.bool)


def radial_mask(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float,
                attention_sink: bool) -> Tensor:
    """:func:`radial_block_mask` for the ops: the cached tensor in eager mode; under ``torch.compile`` /
    ``torch.export`` one opaque custom op (``visattn::radial_block_mask``), so a graph holds one node instead of
    the builder's per-frame-pair loop. Callers must not modify the result."""
    if torch.compiler.is_compiling():
        return _radial_block_mask_op(frames, tokens_per_frame, block_size, decay_factor, attention_sink)
    return radial_block_mask(frames, tokens_per_frame, block_size, decay_factor, attention_sink)


__all__ = ["interval", "pad_to_regions", "radial_block_mask", "radial_mask", "region_grid", "route_regions",
           "sliding_tile_kernel", "vmoba_layout", "vmoba_select"]
