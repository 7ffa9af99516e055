"""Triton backend for neighborhood (NA/DiNA/GNA), (shifted) window, agent, bi-level routing and halo attention.

The dispatcher in ``visattn.functional`` validates and normalises arguments, asks ``*_why_not`` whether this
backend can run the call, then calls ``na`` / ``window``. Importing this package imports Triton if it can (and
records why not otherwise), so ``*_why_not`` stays cheap, never raises, and compiled graphs trace no imports.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from visattn.caching import cached
from visattn.geometry import radial_mask, vmoba_layout, vmoba_select
from visattn.kernels import tiles

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MAX_LENGTH = 65536  # the backward's binary searches run 17 steps
# Imported here, not on first call: torch.compile(fullgraph=True) must never trace a first-time import.
try:
    from visattn.kernels import agent_attn as _agent_kernels
    from visattn.kernels import blocksparse as _blocksparse
    from visattn.kernels import halo as _halo_kernels
    from visattn.kernels import ops as _ops
    from visattn.kernels import routing as _routing_kernels

    _engine_error: str | None = None
except Exception as _err:  # triton missing or broken: *_why_not reports it, never raises
    _ops = _agent_kernels = _routing_kernels = _blocksparse = _halo_kernels = None
    _engine_error = f"triton not importable ({type(_err).__name__}: {_err})"


def _load_ops():
    return _ops


def engine_path(q: Tensor, v: Tensor, rpb: Tensor | None, additional_keys: Tensor | None, window: bool,
                kernel_size: tuple, dilation: tuple, stride: tuple, is_causal: tuple, shift: tuple,
                k: Tensor | None = None) -> tuple[str, str]:
    """Which of the engine's kernels a neighborhood / window call runs: ("small-map", why) for one program per
    dilation group or window (``cells.py``), ("tiled", why) for the halo-tiled kernels (``engine.py``; a trained
    2-D bias read from expanded tiles, ``bias_tiles.py``, says so, and so do the loads: tensor descriptors (TMA) on
    Hopper, or pointer loads and why; ``k`` defaults to ``q`` there)."""
    ops = _load_ops()
    if ops is None:
        return "none", str(_engine_error)
    rank = q.dim() - 3
    pat = ops.make_pattern(rank, window, kernel_size, dilation, stride, is_causal, shift)
    cb = ops.engine_path(q, v, rpb, additional_keys, pat)
    if cb.box:
        unit = "window" if window else "dilation group"
        return "small-map", (f"one program per {unit}: a {'x'.join(map(str, cb.box[3 - rank:]))} padded cell, "
                             f"one-pass backward")
    why = cb.reason
    if ops._tile_layout_of(q, v, rpb, additional_keys, pat) is not None:
        why += "; the bias expanded once per call into its tiles (bias_tiles.py)"
    views = [ops._view3(t, rank) for t in (q, q if k is None else k, v)]
    refusals = [r for r in (ops.kv_descriptor_why_not(t, pat) for t in views) if r is not None]
    loads = (f"pointer loads ({refusals[0]})" if refusals
             else "walked boxes (keys / values, queries / output gradients) through TMA tensor descriptors")
    if not refusals and ops.DKV_STATS != "rows":
        loads += f"; the dK/dV pass's LSE / delta from their head-major copy ({ops.DKV_STATS}, VISATTN_DKV_STATS)"
    return "tiled", f"{why}; {loads}"


def _max_offset(t: Tensor) -> int:
    """Largest element offset inside one batch item (the kernels index those with int32)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))


def _common_why_not(tensors: list[Tensor | None], q: Tensor, k: Tensor, v: Tensor) -> str | None:
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA tensor and TRITON_INTERPRET is not set"
    if q.device.type != "cuda" and q.dtype == torch.bfloat16:
        # measured: na2d 8x8 k3 under the interpreter is off by ~8e8 in bfloat16 (float16: 6e-4), triton 3.8
        return ("bfloat16 under the Triton interpreter: its bfloat16 tl.dot is wrong (errors ~1e9 against float64); "
                "use float16 or float32 on the CPU, or a CUDA device")
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the triton kernels (float16, bfloat16, float32)"
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {max(q.shape[-1], v.shape[-1])} > {_MAX_HEAD_DIM}"
    if k.shape[-2] != q.shape[-2] or v.shape[-2] != q.shape[-2]:
        return "grouped-query attention (fewer kv heads) is not supported by the triton kernels"
    if q.shape[0] * q.shape[-2] > 65535:  # batch*heads is the launch grid's second axis
        return f"batch*heads = {q.shape[0] * q.shape[-2]} > 65535"
    if any(length > _MAX_LENGTH for length in q.shape[1:-2]):
        return f"a spatial dimension is longer than {_MAX_LENGTH}"
    if any(t is not None and _max_offset(t) >= 2**31 for t in tensors):
        return "a tensor is too large for 32-bit offsets within one batch item"
    ops = _load_ops()
    if ops is None:
        return _engine_error
    if q.device.type != "cuda" and not ops.INTERPRETED:
        return "no CUDA tensor and TRITON_INTERPRET was not set when visattn.kernels was imported"
    return None


def na_why_not(q, k, v, kernel_size, dilation, stride, is_causal, rpb, additional_keys,
               additional_values) -> str | None:
    """None when the Triton kernels can run this neighborhood-attention call, else a short reason."""
    try:
        if rpb is not None and rpb.dtype not in _SUPPORTED_DTYPES:
            return f"rpb dtype {rpb.dtype} is not supported by the triton kernels"
        if additional_keys is not None and additional_keys.shape[-2] != q.shape[-2]:
            return "additional keys with a different number of heads are not supported"
        tensors = [q, k, v, additional_keys, additional_values]
        return _common_why_not(tensors, q, k, v)
    except Exception as err:  # never raise from a capability probe
        return f"triton capability check failed ({type(err).__name__}: {err})"


def window_why_not(q, k, v, window_size, shift, rpb) -> str | None:
    """None when the Triton kernels can run this window-attention call, else a short reason."""
    try:
        if rpb is not None and rpb.dtype not in _SUPPORTED_DTYPES:
            return f"rpb dtype {rpb.dtype} is not supported by the triton kernels"
        return _common_why_not([q, k, v], q, k, v)
    except Exception as err:
        return f"triton capability check failed ({type(err).__name__}: {err})"


def na(q: Tensor, k: Tensor, v: Tensor, kernel_size: tuple, dilation: tuple, stride: tuple, is_causal: tuple,
       rpb: Tensor | None, scale: float, additional_keys: Tensor | None,
       additional_values: Tensor | None, return_lse: bool = False):
    """Fused neighborhood attention (forward and backward in Triton), ``[B, *spatial, heads, D_v]``; with
    ``return_lse`` also the natural-log LSE ``[B, *spatial, heads]`` (float32), whose gradient is propagated."""
    return _load_ops().local_attention(q, k, v, rpb, additional_keys, additional_values, False, kernel_size,
                                       dilation, stride, is_causal, (0,) * (q.dim() - 3), scale, return_lse)


def packed_qkv_enabled() -> bool:
    """Whether calls on a packed ``qkv`` (eager or traced) take ``na_packed`` / ``window_packed``
    (``ops.PACKED_QKV``; ``VISATTN_PACKED_QKV=0`` turns it off)."""
    return _load_ops().PACKED_QKV


def na_packed(qkv: Tensor, kernel_size: tuple, dilation: tuple, stride: tuple, is_causal: tuple,
              rpb: Tensor | None, scale: float, prepared=None) -> Tensor:
    """``na`` on the three views of a packed ``qkv`` ``[B, *spatial, 3, heads, D]``; under autograd ``qkv`` gets
    one packed gradient written by the backward kernels (no stack of dq, dk, dv). ``prepared``: ``prepare_na``'s
    result for the views of a call of this geometry, replayed (its plans) while it is not retired."""
    return _load_ops().local_attention_packed(qkv, rpb, False, kernel_size, dilation, stride, is_causal,
                                              (0,) * (qkv.dim() - 4), scale, prepared)


def window_packed(qkv: Tensor, window_size: tuple, shift: tuple, rpb: Tensor | None, scale: float,
                  prepared=None) -> Tensor:
    """``window`` on the three views of a packed ``qkv`` ``[B, *spatial, 3, heads, D]``, one packed gradient as in
    ``na_packed``; ``prepared``: ``prepare_window``'s result for the views, replayed while not retired."""
    rank = qkv.dim() - 4
    return _load_ops().local_attention_packed(qkv, rpb, True, window_size, (1,) * rank, (1,) * rank,
                                              (False,) * rank, shift, scale, prepared)


def prepare_na(q: Tensor, k: Tensor, v: Tensor, kernel_size: tuple, dilation: tuple, stride: tuple,
               is_causal: tuple, rpb: Tensor | None, scale: float, additional_keys: Tensor | None,
               additional_values: Tensor | None, return_lse: bool = False):
    """``na``'s call resolved for this geometry (an ``ops.PreparedCall``; None while tracing). Calling it with the
    tensors of a call of the same geometry returns what ``na`` returns, or None once the plan was retired."""
    return _load_ops().prepare(q, k, v, rpb, additional_keys, additional_values, False, kernel_size, dilation,
                               stride, is_causal, (0,) * (q.dim() - 3), scale, return_lse)


def prepare_window(q: Tensor, k: Tensor, v: Tensor, window_size: tuple, shift: tuple, rpb: Tensor | None,
                   scale: float):
    """``window``'s call resolved for this geometry, as ``prepare_na``."""
    rank = q.dim() - 3
    return _load_ops().prepare(q, k, v, rpb, None, None, True, window_size, (1,) * rank, (1,) * rank,
                               (False,) * rank, shift, scale)


def window(q: Tensor, k: Tensor, v: Tensor, window_size: tuple, shift: tuple, rpb: Tensor | None,
           scale: float) -> Tensor:
    """Fused (shifted) window attention, ``[B, *spatial, heads, D_v]``."""
    rank = q.dim() - 3
    return _load_ops().local_attention(q, k, v, rpb, None, None, True, window_size, (1,) * rank, (1,) * rank,
                                       (False,) * rank, shift, scale)


def agent_why_not(q, k, v, agents) -> str | None:
    """None when the fused agent kernels (``agent_attn.py``) can run this call, else a short reason."""
    try:
        if agents.shape[1] > tiles.MAX_AGENTS:
            return f"{agents.shape[1]} agents > {tiles.MAX_AGENTS} (stage B holds every agent of a row in one tile)"
        blocks = tiles.agent_tiles(agents.shape[1], q.shape[-1], v.shape[-1], q.dtype)
        if blocks["BLOCK_A"] * blocks["BLOCK_D"] > tiles.MAX_AGENT_TILE:
            return (f"{agents.shape[1]} agents with head_dim {max(q.shape[-1], v.shape[-1])}: the padded agent tile "
                    f"({blocks['BLOCK_A'] * blocks['BLOCK_D']} elements) exceeds 128x128")
        tokens = 1
        for size in q.shape[1:-2]:
            tokens *= size
        if tokens >= 2**31 // max(1, agents.shape[1]):
            return "tokens * agents does not fit 32-bit offsets (bias gradients)"
        return _common_why_not([q, k, v, agents], q, k, v)
    except Exception as err:
        return f"triton capability check failed ({type(err).__name__}: {err})"


def agent(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor | None, query_bias: Tensor | None,
          scale: float) -> Tensor:
    """Fused agent attention (both softmax stages, forward and backward in Triton), ``[B, *spatial, heads, D_v]``."""
    return _agent_kernels.agent_attention(q, k, v, agents, agent_bias, query_bias, scale)


def bilevel_routing_why_not(q, k, v, regions, topk) -> str | None:
    """None when the routed-attention kernels (``routing.py``) can run this call, else a short reason."""
    try:
        reason = _common_why_not([q, k, v], q, k, v)
        if reason is None and q.shape[1] * q.shape[2] // (regions[0] * regions[1]) > 4096:
            reason = "regions of more than 4096 tokens"  # the dK/dV pass loops over whole query regions
        return reason
    except Exception as err:
        return f"triton capability check failed ({type(err).__name__}: {err})"


def routing_path(height: int, width: int, regions: tuple) -> tuple[str, str]:
    """Which schedules of the routed-attention kernels a ``height x width`` map on a ``regions`` grid takes:
    "map" (one program per tile of raster queries against the whole map, the routing as a mask: small maps such as
    BiFormer-T's 14x14 stage), "regions" (one program per region tile over its routed keys), or "mixed" (the region
    forward, the map backward; ``routing.MAP_PASSES`` says which passes may take the map schedule), with why."""
    if _routing_kernels is None:
        return "none", str(_engine_error)
    padded = (-(-height // regions[0]) * regions[0], -(-width // regions[1]) * regions[1])
    why_not = _routing_kernels.map_schedule_why_not(*padded, tuple(regions))
    if why_not is not None:
        return "regions", why_not
    fits = (f"{padded[0] * padded[1]} tokens and {regions[0] * regions[1]} regions fit the map schedule "
            f"(at most {_routing_kernels.MAP_MAX_TOKENS} and {_routing_kernels.MAP_MAX_REGIONS})")
    passes = set(_routing_kernels.MAP_PASSES)
    if passes >= {"fwd", "bwd"}:
        return "map", fits
    if passes == {"bwd"}:
        return "mixed", f"{fits}; the forward keeps the region schedule (faster there), the backward takes the map's"
    if passes == {"fwd"}:
        return "mixed", f"{fits}; the forward takes the map schedule, the backward keeps the region schedule"
    return "regions", f"{fits}, but routing.MAP_PASSES switches the map schedule off"


def bilevel_routing(q: Tensor, k: Tensor, v: Tensor, regions: tuple, topk: int, scale: float,
                    return_routing: bool = False):
    """Fused bi-level routing attention: routed regions read in place, no key/value gather."""
    return _routing_kernels.bilevel_routing(q, k, v, tuple(regions), int(topk), float(scale),
                                            return_routing=return_routing)


def radial_why_not(q, k, v, block_size, additional_keys, additional_values) -> str | None:
    """None when the block-sparse kernels (``blocksparse.py``) can run this Radial Attention call, else why not."""
    try:
        if additional_keys is not None and additional_keys.shape[-2] != q.shape[-2]:
            return "additional keys with a different number of heads are not supported"
        tokens = q.shape[1] * q.shape[2] * q.shape[3]
        if q.shape[0] * q.shape[-2] * tokens >= 2**31:
            return "batch * heads * tokens does not fit the 32-bit row statistics"
        reason = _common_why_not([q, k, v, additional_keys, additional_values], q, k, v)
        if reason is None and tokens * max(q.shape[-2] * q.shape[-1], v.shape[-2] * v.shape[-1]) >= 2**31:
            reason = "a tensor is too large for 32-bit offsets within one batch item"
        return reason
    except Exception as err:
        return f"triton capability check failed ({type(err).__name__}: {err})"


_RADIAL_TABLES: dict = {}


def radial(q: Tensor, k: Tensor, v: Tensor, block_size: int, decay_factor: float, attention_sink: bool,
           scale: float, additional_keys: Tensor | None = None, additional_values: Tensor | None = None) -> Tensor:
    """Fused Radial Attention on ``[B, T, H, W, heads, D]``: the static block mask's CSR tables (built once per
    geometry and device) drive the block-sparse kernels; ``[B, T, H, W, heads, D_v]``."""
    batch, frames, height, width, heads, _ = q.shape
    per = height * width

    def build():
        mask = radial_mask(frames, per, block_size, float(decay_factor), bool(attention_sink))
        return _blocksparse.tables(mask.to(q.device))

    key = (frames, per, block_size, float(decay_factor), bool(attention_sink), str(q.device))
    tabs = cached(_RADIAL_TABLES, key, build, q)
    out = _blocksparse.block_sparse_attention(q.flatten(1, 3), k.flatten(1, 3), v.flatten(1, 3), tabs, block_size,
                                              block_size, scale, additional_keys, additional_values)
    return out.view(batch, frames, height, width, heads, v.shape[-1])


def vmoba_why_not(q, k, v, additional_keys, additional_values) -> str | None:
    """None when the block-sparse kernels can run this VMoBA call, else why not."""
    return radial_why_not(q, k, v, 1, additional_keys, additional_values)


VMOBA_QUERY_BLOCK = 64  # query rows sharing one union list of selected key chunks
_VMOBA_ORDERS: dict = {}


def _choice_order(sel: Tensor) -> Tensor:
    """``[B, heads, N]`` order of the query rows sorted by their chunk choice ``sel [B, heads, N, C]`` (rows with the
    same choice adjacent): a stable sort on 62-chunk words of the choice bits, least significant word first."""
    order = None
    weights = 2 ** torch.arange(62, device=sel.device, dtype=torch.int64)
    for start in range(0, sel.shape[-1], 62):
        word = (sel[..., start:start + 62].to(torch.int64) * weights[:min(62, sel.shape[-1] - start)]).sum(-1)
        if order is not None:
            word = word.gather(2, order)
        step = torch.sort(word, dim=2, stable=True).indices
        order = step if order is None else order.gather(2, step)
    return order


def vmoba(q: Tensor, k: Tensor, v: Tensor, chunk: tuple, select_mode: str, topk: int, threshold: float,
          threshold_type: str, scale: float, additional_keys: Tensor | None = None,
          additional_values: Tensor | None = None) -> Tensor:
    """Fused VMoBA on ``[B, T, H, W, heads, D]``: tokens gathered into chunk order, each query's chunk choice
    routed on the device (``geometry.vmoba_select``) into a per-(batch, head) CSR of the chunks any of a query
    block's rows chose plus the per-row choice bits, the block-sparse kernels, the output scattered back."""
    batch, frames, height, width, heads, _ = q.shape
    n = frames * height * width
    key = ((frames, height, width), tuple(chunk), str(q.device))

    def build():
        order, length = vmoba_layout(key[0], key[1])
        return (None, None, length) if order is None else (order.to(q.device), torch.argsort(order).to(q.device),
                                                            length)

    perm, inverse, chunk_len = cached(_VMOBA_ORDERS, key, build, q)  # no host copy after the first call
    qf, kf, vf = (t.reshape(batch, n, heads, t.shape[-1]) for t in (q, k, v))
    if perm is not None:
        qf, kf, vf = (t[:, perm] for t in (qf, kf, vf))
    sel = vmoba_select(qf, kf, chunk_len, select_mode, topk, threshold, threshold_type)  # [B, heads, N, C]
    n_chunks = sel.shape[-1]
    # Queries are grouped by their choice (per batch and head) before the union of each query block is taken:
    # in chunk order, neighbouring rows choose differently, and their union made the kernel walk nearly every
    # chunk (slower than dense attention on an H100 at Wan 720p). Grouped, a block's union is its rows' choice.
    by_choice = _choice_order(sel)  # [B, heads, N]
    sel = sel.gather(2, by_choice[..., None].expand_as(sel))
    rows_of = by_choice.transpose(1, 2)[..., None]  # [B, N, heads, 1]
    qs = qf.gather(1, rows_of.expand_as(qf))
    q_block = VMOBA_QUERY_BLOCK
    padded = -(-n // q_block) * q_block
    union = torch.nn.functional.pad(sel, (0, 0, 0, padded - n)).view(batch * heads, padded // q_block, q_block,
                                                                      n_chunks).any(dim=2)
    tabs = _blocksparse.tables(union)
    rows = sel.reshape(batch * heads, n, n_chunks).to(torch.int8).contiguous()
    out = _blocksparse.block_sparse_attention(qs, kf, vf, tabs, q_block, chunk_len, scale, additional_keys,
                                              additional_values, sel=rows)
    out = torch.empty_like(out).scatter(1, rows_of.expand_as(out), out)  # back to chunk order (differentiable)
    if perm is not None:
        out = out[:, inverse]
    return out.reshape(batch, frames, height, width, heads, v.shape[-1])


def halo_why_not(q, k, v, block, halo, rel_h, rel_w) -> str | None:
    """None when the fused HaloNet kernels (``halo.py``) can run this call, else a short reason."""
    try:
        if rel_h is not None and (rel_h.dtype not in _SUPPORTED_DTYPES or rel_w.dtype not in _SUPPORTED_DTYPES):
            return f"relative table dtype {rel_h.dtype} is not supported by the triton kernels"
        reason = _common_why_not([q, k, v], q, k, v)
        if reason is not None or _halo_kernels is None:
            return reason or _engine_error
        wins = [b + 2 * h for b, h in zip(block, halo, strict=True)]
        if max(wins) > _halo_kernels.MAX_WINDOW:
            return f"halo window {tuple(wins)} wider than {_halo_kernels.MAX_WINDOW}"
        blocks = (k.shape[1] // block[0]) * (k.shape[2] // block[1])
        per_block = q.shape[1] * q.shape[2] // blocks
        if per_block > _halo_kernels.MAX_QUERY_BLOCK:
            return f"{per_block} queries per block > {_halo_kernels.MAX_QUERY_BLOCK} (one tile holds a block)"
        if blocks > 2**31 - 1:
            return "too many blocks for the launch grid"
        return None
    except Exception as err:
        return f"triton capability check failed ({type(err).__name__}: {err})"


def halo(q: Tensor, k: Tensor, v: Tensor, block: tuple, halo: tuple, rel_h: Tensor | None, rel_w: Tensor | None,
         scale: float) -> Tensor:
    """Fused HaloNet attention (forward and backward in Triton), ``[B, Hq, Wq, heads, D_v]``."""
    return _halo_kernels.halo_attention(q, k, v, tuple(block), tuple(halo), rel_h, rel_w, float(scale))


__all__ = ["agent", "agent_why_not", "bilevel_routing", "bilevel_routing_why_not", "halo", "halo_why_not", "na",
           "na_why_not", "prepare_na", "prepare_window", "radial", "radial_why_not", "routing_path", "vmoba",
           "vmoba_why_not", "window", "window_why_not"]
