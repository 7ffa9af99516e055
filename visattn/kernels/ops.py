"""Launchers for the engine, its ops for traced calls (fake implementations, autograd in a traced
``autograd.Function``) and the eager ``autograd.Function``.

Every tensor is viewed as ``[B, L0, L1, L2, heads, D]`` by inserting size-1 spatial dims after the batch dim (a
view: strided inputs such as ``qkv.unbind(-3)`` are read in place). Pattern arguments are padded the same way.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from visattn.caching import may_cache
from visattn.kernels.backward import _bwd_dkv_kernel, _bwd_dq_kernel, _bwd_extra_dkv_kernel
from visattn.kernels.bias_tiles import _bias_grad_kernel, _expand_key_walk_kernel, _expand_query_walk_kernel
from visattn.kernels.cells import _cell_bwd_kernel, _cell_fwd_kernel
from visattn.kernels.engine import _fwd_kernel
from visattn.kernels.launch import INTERPRETED, KernelLauncher, LaunchRecord, tensor_key
from visattn.kernels.tables import key_walk_length, query_range_table, query_walk_length, rpb_joint_map, rpb_offset_maps
from visattn.kernels.tiles import Tiles, binnable, choose_tiles, dot_precision, padded_head_dim

# Test hook (visattn.bench.check): fill outputs with NaN before launching, so an unwritten element fails a check.
POISON = False
_LOG2E = 1.4426950408889634
_LN2_RATIO = 1.0 / _LOG2E  # ln 2: natural-log LSE = log2-LSE * ln 2


class Pattern(NamedTuple):
    """A local pattern in canonical 3-D form (leading dims padded with size-1, kernel-1 dims)."""

    window: bool
    kernel: tuple  # kernel size (neighborhood) or window size
    dilation: tuple
    stride: tuple
    causal: tuple
    shift: tuple


def make_pattern(rank: int, window: bool, kernel, dilation, stride, causal, shift) -> Pattern:
    pad = 3 - rank
    return Pattern(window, (1,) * pad + tuple(kernel), (1,) * pad + tuple(dilation), (1,) * pad + tuple(stride),
                   (False,) * pad + tuple(bool(c) for c in causal), (0,) * pad + tuple(shift))


def _view3(x: Tensor, rank: int) -> Tensor:
    for _ in range(3 - rank):
        x = x.unsqueeze(1)
    return x


def _rpb3(rpb: Tensor, rank: int) -> Tensor:
    for _ in range(3 - rank):
        rpb = rpb.unsqueeze(1)
    return rpb


def _tiles_per_group(pat: Pattern, lengths, box) -> list[int]:
    out = []
    for i in range(3):
        if pat.window:
            w, t = pat.kernel[i], pat.shift[i]
            out.append((lengths[i] // w + (1 if t > 0 else 0)) * math.ceil(w / box[i]))
        else:
            out.append(math.ceil(math.ceil(lengths[i] / pat.dilation[i]) / box[i]))
    return out


def _tiles(pass_name: str, pat: Pattern, lengths, dtype: torch.dtype, head_dim: int, bias: bool = False,
           bins: bool = False) -> Tiles:
    extents = tuple(math.ceil(lengths[i] / pat.dilation[i]) for i in range(3))
    bits = 16 if dtype in (torch.float16, torch.bfloat16) else 32
    return choose_tiles(pass_name, pat.window, extents, tuple(pat.kernel), tuple(pat.stride), bits, head_dim,
                        INTERPRETED, bias, bins)


def _pattern_args(pat: Pattern, lengths, n_tiles):
    return (*lengths, *pat.dilation, *n_tiles, *pat.kernel, *pat.stride, *pat.shift)


def _pattern_constexprs(pat: Pattern, tiles, head_d: int, head_dv: int, dtype) -> dict:
    return dict(
        M0=tiles.m[0], M1=tiles.m[1], M2=tiles.m[2], N0=tiles.n[0], N1=tiles.n[1], N2=tiles.n[2],
        BLOCK_D=padded_head_dim(head_d), BLOCK_DV=padded_head_dim(head_dv),
        CAUSAL0=pat.causal[0], CAUSAL1=pat.causal[1], CAUSAL2=pat.causal[2], WINDOW=pat.window,
        DOT_PREC=dot_precision(dtype), num_warps=tiles.warps, num_stages=tiles.stages,
    )


def _new(shape, like: Tensor, dtype=None) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    if POISON:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _optional(t: Tensor | None, like: Tensor, n_strides: int):
    """A tensor and its strides, or a dummy pointer with zero strides."""
    return (like, (0,) * n_strides) if t is None else (t, t.stride())


# ------------------------------------------------------------------------------------------------------------
# The small-map path (cells.py): a whole dilation group or window per program.
# ------------------------------------------------------------------------------------------------------------

# Escape hatch: False (or VISATTN_PACKED_QKV=0 at import) runs the nn modules' packed qkv as three unbound views.
PACKED_QKV = os.environ.get("VISATTN_PACKED_QKV", "1") != "0"
# Test hook and escape hatch: False (or VISATTN_SMALL_MAP=0 at import) sends every call to the tiled kernels.
SMALL_MAP = os.environ.get("VISATTN_SMALL_MAP", "1") != "0"
CELL_MAX = 128  # tokens of a padded cell box: its keys, values and dK/dV accumulators stay in registers
CELL_WASTE = 8  # masked-dense pairs per needed pair the small-map path accepts (NAT-T's 14x14 stage: 5.2)
_CELL_REGS = {2: 8192, 4: 4096}  # max cell tokens x padded head dim per element size (registers per program)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class CellBox(NamedTuple):
    """The padded box of a cell and its launch shape; ``reason`` says why the small-map path was declined."""

    box: tuple | None
    reason: str
    sub_fwd: int = 0
    sub_bwd: int = 0
    warps: int = 4


CELL_PROGRAMS = 1024  # small-map programs to keep at least (a few per SM); a test lowers it to exercise NB > 1


def batch_per_program(items: int) -> int:
    """Batch items per small-map program: at most 8, while at least ``CELL_PROGRAMS`` programs remain, so the mask,
    bias tile and bias binning are shared by up to 8 items."""
    nb = 1
    while nb < 8 and items // (2 * nb) >= CELL_PROGRAMS:
        nb *= 2
    return nb


@functools.lru_cache(maxsize=1024)
def cell_box(pat: Pattern, lengths: tuple, head_d: int, head_dv: int, elem_bytes: int, rank: int,
             has_rpb: bool, has_extra: bool) -> CellBox:
    """Whether the small-map path runs this geometry: its cell box (a power of two per dimension), or why not."""
    if has_extra:
        return CellBox(None, "additional keys and values run on the tiled path")
    if has_rpb and rank != 2:
        return CellBox(None, "a bias gradient binned per cell needs a 2-D map (1-D and 3-D biases: tiled path)")
    if has_rpb and max(head_d, head_dv) <= 16 and not INTERPRETED:
        # Compiled by triton 3.6 for an H100, this kernel gave a wrong (once non-finite) dK with a bias at head_dim
        # 16 (check-h100-2026-12-06-run4-failed.json); 32 passes, and so does the tiled path on the same problem.
        # The interpreter runs the same kernel correctly, so the CPU tests keep exercising it at head_dim 16.
        return CellBox(None, "a bias with head_dim <= 16 runs on the tiled path (the cell backward miscompiles)")
    extents = [pat.kernel[i] if pat.window else -(-lengths[i] // pat.dilation[i]) for i in range(3)]
    box = [_pow2(e) for e in extents]
    cell = math.prod(box)
    if cell < 16:  # tl.dot needs 16 along every axis: widen the last dimension (the extra keys are masked)
        box[2] *= 16 // cell
        cell = 16
    if cell > CELL_MAX:
        return CellBox(None, f"a cell of {cell} padded tokens exceeds {CELL_MAX}")
    needed = math.prod(pat.kernel)
    if cell > CELL_WASTE * needed:
        return CellBox(None, f"a cell of {cell} padded tokens for {needed} keys per query is too sparse for "
                             f"masked-dense work (> {CELL_WASTE}x)")
    width = max(padded_head_dim(head_d), padded_head_dim(head_dv))
    if cell * width > _CELL_REGS.get(elem_bytes, 4096):
        return CellBox(None, f"a cell of {cell} tokens with head_dim {max(head_d, head_dv)} exceeds the registers "
                             f"of one program")
    sub_fwd = min(cell, 64)
    sub_bwd = cell if cell <= 64 else 32
    if has_rpb:  # the bias tile and bins take whole rows of the box
        sub_fwd, sub_bwd = max(sub_fwd, box[2]), max(sub_bwd, box[2])
        if min(sub_fwd, sub_bwd) // box[2] * box[1] < 16 or box[2] * box[2] < 16:
            return CellBox(None, f"a {box[1]}x{box[2]} cell is too narrow for the bias tile's products (tl.dot: 16)")
    return CellBox(tuple(box), "", sub_fwd, sub_bwd, 4 if cell <= 64 else 8)


def _cache_unless_tracing(cached_fn):
    """``cached_fn`` (an ``lru_cache`` wrapper), or the function it wraps while dynamo traces: dynamo ignores the
    cache there anyway, and says so with a warning in the user's log."""
    return cached_fn.__wrapped__ if torch.compiler.is_compiling() else cached_fn


def engine_path(q: Tensor, v: Tensor, rpb: Tensor | None, extra_k: Tensor | None, pat: Pattern) -> CellBox:
    """The engine path of a call: ``box`` set for the small-map path, else ``reason`` says why the tiled one."""
    if not SMALL_MAP:
        return CellBox(None, "the small-map path is switched off (visattn.kernels.ops.SMALL_MAP)")
    rank = q.dim() - 3
    lengths = (1,) * (3 - rank) + tuple(q.shape[1:-2])  # the canonical 3-D lengths, without building the view
    return _cache_unless_tracing(cell_box)(pat, lengths, q.shape[-1], v.shape[-1], q.element_size(), rank,
                                           rpb is not None, extra_k is not None)


def _cell_constexprs(pat: Pattern, cb: CellBox, sub: int, head_d: int, head_dv: int, dtype, rpb) -> dict:
    # the bias tile's one-hot products are exact in tf32 for a 16-bit table; a float32 table needs tf32x3
    bias_prec = "ieee" if INTERPRETED else ("tf32" if rpb is not None and rpb.element_size() == 2 else "tf32x3")
    return dict(C0=cb.box[0], C1=cb.box[1], C2=cb.box[2], SUB=sub, BLOCK_D=padded_head_dim(head_d),
                BLOCK_DV=padded_head_dim(head_dv), CAUSAL0=pat.causal[0], CAUSAL1=pat.causal[1],
                CAUSAL2=pat.causal[2], WINDOW=pat.window, DOT_PREC=dot_precision(dtype), O1=_bins(pat.kernel[1]),
                O2=_bins(pat.kernel[2]), BIAS_PREC=bias_prec)


_CELL_FWD = KernelLauncher(_cell_fwd_kernel)
_CELL_BWD = KernelLauncher(_cell_bwd_kernel)


def _forward_shapes(q, k, v):
    """Canonical 3-D views and sizes of a forward call: rank, (q3, k3, v3), B, lengths, H, D, Dv, out/LSE shapes."""
    rank = q.dim() - 3
    q3, k3, v3 = (_view3(t, rank) for t in (q, k, v))
    B, L0, L1, L2, H, D = q3.shape
    Dv = v3.shape[-1]
    return rank, (q3, k3, v3), B, (L0, L1, L2), H, D, Dv, (*q.shape[:-1], Dv), tuple(q.shape[:-1])


def _cell_forward_plan(q, k, v, rpb, pat: Pattern, scale: float, cb: CellBox) -> _ForwardPlan:
    rank, (q3, k3, v3), B, lengths, H, D, Dv, out_shape, lse_shape = _forward_shapes(q, k, v)
    n_tiles = _tiles_per_group(pat, lengths, cb.box)
    r_st = (0,) * 4 if rpb is None else _rpb3(rpb, rank).stride()
    n_cells = math.prod(pat.dilation[i] * n_tiles[i] for i in range(3))
    scalars = (*q3.stride(), *k3.stride(), *v3.stride(), *_view3_strides(out_shape, rank)[:5],
               *_view3_strides(lse_shape, rank)[:4], *r_st, B, H, *_pattern_args(pat, lengths, n_tiles),
               scale * _LOG2E, D, Dv)
    constexprs = _cell_constexprs(pat, cb, cb.sub_fwd, D, Dv, q.dtype, rpb)
    n_sub = math.prod(cb.box) // cb.sub_fwd
    nb = batch_per_program(n_cells * n_sub * H * B)
    constexprs.update(HAS_RPB=rpb is not None, NB=nb)
    grid = (n_cells * n_sub, H, triton_cdiv(B, nb))
    return _ForwardPlan(_CELL_FWD.record(grid, 6, scalars, constexprs, cb.warps, 1), out_shape, lse_shape, True)


class _CellBackwardPlan(NamedTuple):
    launch: LaunchRecord
    part_shape: tuple | None  # [H, batch groups, cells, O1, O2] with a bias


def _grad_strides(q: Tensor, k: Tensor, v: Tensor, grads: tuple | None) -> tuple:
    """The 5 leading strides of the canonical 3-D views of dq, dk, dv: fresh contiguous tensors, or the caller's
    ``grads`` (views of one packed gradient, ``_PackedLocalAttention``)."""
    rank = q.dim() - 3
    if grads is None:
        return tuple(_view3_strides(t.shape, rank)[:5] for t in (q, k, v))
    return tuple(_view3(g, rank).stride()[:5] for g in grads)


def _cell_backward_plan(grad_out, q, k, v, lse, rpb, pat: Pattern, scale: float, grad_lse,
                        cb: CellBox, grads: tuple | None = None) -> _CellBackwardPlan:
    rank = q.dim() - 3
    q3, k3, v3, do3, l3 = (_view3(t, rank) for t in (q, k, v, grad_out, lse))
    B, L0, L1, L2, H, D = q3.shape
    Dv = v3.shape[-1]
    lengths = (L0, L1, L2)
    n_tiles = _tiles_per_group(pat, lengths, cb.box)
    n_cells = math.prod(pat.dilation[i] * n_tiles[i] for i in range(3))
    r_st = (0,) * 4 if rpb is None else _rpb3(rpb, rank).stride()
    o1, o2 = _bins(pat.kernel[1]), _bins(pat.kernel[2])
    dq_st, dk_st, dv_st = _grad_strides(q, k, v, grads)
    scalars = (*q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *dq_st, *dk_st, *dv_st, *l3.stride()[:4],
               *r_st, B, H, *_pattern_args(pat, lengths, n_tiles), scale * _LOG2E, scale, D, Dv)
    constexprs = _cell_constexprs(pat, cb, cb.sub_bwd, D, Dv, q.dtype, rpb)
    nb = batch_per_program(n_cells * H * B)
    constexprs.update(HAS_RPB=rpb is not None, HAS_GLSE=grad_lse is not None, NB=nb,
                      BINS_PREC="ieee" if INTERPRETED else "tf32x3")
    groups = triton_cdiv(B, nb)
    rec = _CELL_BWD.record((n_cells, H, groups), 11, scalars, constexprs, cb.warps, 1)
    return _CellBackwardPlan(rec, None if rpb is None else (H, groups, n_cells, o1, o2))


_FWD = KernelLauncher(_fwd_kernel)
_DQ = KernelLauncher(_bwd_dq_kernel)
_DKV = KernelLauncher(_bwd_dkv_kernel)
_EXPAND_Q = KernelLauncher(_expand_query_walk_kernel)
_EXPAND_K = KernelLauncher(_expand_key_walk_kernel)
_BIAS_GRAD = KernelLauncher(_bias_grad_kernel)


class _PlanCache(dict):
    """The launch plans by geometry. ``clear()`` also moves ``epoch`` on, which retires every ``PreparedCall`` that
    holds a plan from before (tests and benchmarks clear the cache when they switch a path)."""

    epoch = 0

    def clear(self) -> None:
        self.epoch += 1
        super().clear()


_PLANS = _PlanCache()

# ------------------------------------------------------------------------------------------------------------
# Bias tiles (bias_tiles.py): a trained 2-D bias on the tiled path, expanded once per call.
# ------------------------------------------------------------------------------------------------------------

# Test hook and escape hatch: False (or VISATTN_BIAS_TILES=0 at import) gathers the bias per pair as before.
BIAS_TILES = os.environ.get("VISATTN_BIAS_TILES", "1") != "0"
BIAS_TILE_BYTES = 256 << 20  # one expanded layout above this (huge maps with a bias) gathers per pair instead
# 16-bit inputs read their expanded bias as float16 (half the traffic of float32; its rounding, 2^-11 of the
# log2-domain bias, is below that of the bf16 probabilities the P V product rounds to); float32 inputs keep float32.
BIAS_TILE_HALF = os.environ.get("VISATTN_BIAS_TILE_HALF", "1") != "0"


class BiasTileLayout(NamedTuple):
    """Where the expanded bias of one geometry lives: the forward / dQ walk's tiles (``q_*``: programs, most key
    tiles per program) and the dK/dV walk's (``k_*``), and the storage dtype."""

    q_tiles: Tiles
    q_n_tiles: tuple
    q_programs: int
    q_walk: int
    k_tiles: Tiles
    k_n_tiles: tuple
    k_programs: int
    k_walk: int
    dtype: torch.dtype

    def q_shape(self, heads: int) -> tuple:
        return (heads, self.q_programs, self.q_walk, math.prod(self.q_tiles.m) * math.prod(self.q_tiles.n))

    def k_shape(self, heads: int) -> tuple:
        return (heads, self.k_programs, self.k_walk, math.prod(self.k_tiles.m) * math.prod(self.k_tiles.n))


@functools.lru_cache(maxsize=512)
def bias_tile_layout(pat: Pattern, lengths: tuple, dtype: torch.dtype, head_dim: int, heads: int, rank: int,
                     has_extra: bool, half: bool = True, grad_buffer: bool = True) -> BiasTileLayout | None:
    """The expanded-bias layout of a tiled call with a trained bias, or None where the per-pair gather runs
    instead: ranks 1 and 3 (their gradient takes the per-pair buffer), extra keys, tiles whose bias gradient
    cannot be binned in registers (only without ``grad_buffer``), or an expansion above ``BIAS_TILE_BYTES``.
    ``half``: 16-bit inputs store the expansion in float16. ``grad_buffer``: the gradient comes from the dQ pass's
    per-pair buffer (``BIAS_GRAD_BUFFER``), not the recomputing kernel; an argument so the cache is keyed on it."""
    if rank != 2 or has_extra:
        return None
    # the recomputing bias-gradient kernel bins dS per tile pair; the per-pair buffer takes any tiles
    q_tiles = _tiles("dq", pat, lengths, dtype, head_dim, bias=True, bins=not grad_buffer)
    if not grad_buffer and not binnable(q_tiles.m, q_tiles.n):
        return None
    k_tiles = _tiles("dkv", pat, lengths, dtype, head_dim, bias=True)
    q_n = tuple(_tiles_per_group(pat, lengths, q_tiles.m))
    k_n = tuple(_tiles_per_group(pat, lengths, k_tiles.n))
    store = torch.float16 if dtype in (torch.float16, torch.bfloat16) and half else torch.float32
    layout = BiasTileLayout(
        q_tiles, q_n, math.prod(pat.dilation[i] * q_n[i] for i in range(3)),
        max(1, key_walk_length(pat, lengths, q_n, q_tiles.m, q_tiles.n)),
        k_tiles, k_n, math.prod(pat.dilation[i] * k_n[i] for i in range(3)),
        max(1, query_walk_length(pat, lengths, k_n, k_tiles.m, k_tiles.n)), store)
    size = max(math.prod(layout.q_shape(heads)), math.prod(layout.k_shape(heads))) * store.itemsize
    return layout if size <= BIAS_TILE_BYTES else None


def _tile_layout_of(q: Tensor, v: Tensor, rpb: Tensor | None, extra_k: Tensor | None,
                    pat: Pattern) -> BiasTileLayout | None:
    if rpb is None or not BIAS_TILES:
        return None
    rank = q.dim() - 3
    lengths = (1,) * (3 - rank) + tuple(q.shape[1:-2])
    return bias_tile_layout(pat, lengths, q.dtype, max(q.shape[-1], v.shape[-1]), q.shape[-2], rank,
                            extra_k is not None, BIAS_TILE_HALF, BIAS_GRAD_BUFFER)


def _walk_constexprs(pat: Pattern, tiles: Tiles) -> dict:
    return dict(M0=tiles.m[0], M1=tiles.m[1], M2=tiles.m[2], N0=tiles.n[0], N1=tiles.n[1], N2=tiles.n[2],
                CAUSAL0=pat.causal[0], CAUSAL1=pat.causal[1], CAUSAL2=pat.causal[2], WINDOW=pat.window)


def _expand_query_record(pat: Pattern, lengths, layout: BiasTileLayout, r_st, heads: int) -> LaunchRecord:
    scalars = (*r_st, *_pattern_args(pat, lengths, layout.q_n_tiles), layout.q_walk)
    return _EXPAND_Q.record((layout.q_programs, heads), 2, scalars, _walk_constexprs(pat, layout.q_tiles), 4, 1)


def _remember_plan(key, plan):
    if len(_PLANS) > 1024:  # bounded: the geometries one process sees are few
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _view3_strides(shape, rank: int) -> tuple:
    """Strides of the canonical 3-D view of a freshly allocated (contiguous) tensor of ``shape``."""
    return _view3(torch.empty(shape, device="meta"), rank).stride()


def _split_options(constexprs: dict) -> tuple[dict, int, int]:
    constexprs = dict(constexprs)
    return constexprs, constexprs.pop("num_warps"), constexprs.pop("num_stages")


# ------------------------------------------------------------------------------------------------------------
# Tensor-descriptor (TMA) loads of the tiled passes' walked boxes (Hopper and later).
# ------------------------------------------------------------------------------------------------------------

try:  # host tensor descriptors (absent from Triton 3.3, which torch 2.7 pins)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# On by default on Hopper (sm90), where they were timed and swept (H100: FLUX-4K NA forward 1.18x, fwd+bwd 1.11x
# faster than pointer loads; 2912 sweep problems, none failed). None = that default; True (VISATTN_KV_DESC=1) also
# opts in newer GPUs, untested on hardware; False (VISATTN_KV_DESC=0) keeps pointer loads everywhere.
# KV_DESC_INTERPRETED is the test hook that runs the descriptor path under the interpreter (no compute capability).
KV_DESCRIPTORS: bool | None = {"1": True, "0": False}.get(os.environ.get("VISATTN_KV_DESC", ""))
KV_DESC_INTERPRETED = False
# By default, operands of head_dim <= 32 (NAT / DiNAT / Swin) keep pointer loads: there a descriptor saves no GPU
# time, while Triton's launcher encodes each one on the host (~15 us a descriptor, six per fwd+bwd). H100, NAT-T s3
# B256: fwd 0.162 -> 0.141 ms, host 47.7 -> 33.1 us (engine-h100-2026-12-07-run4-{desc,ptr}.json).
KV_DESC_POINTER_HEAD_DIM = 32


class KVDescriptor(NamedTuple):
    """A 5-D descriptor view ``[B * L0, L1, L2, heads, D]`` of one operand a pass walks (keys, values, queries or
    output gradients), and its block (one walked box). ``fields``: a ``TensorDescriptor`` of the view built (and
    validated) by Triton when the plan was made, without its base; None where Triton's descriptor keeps no
    ``__dict__``."""

    shape: tuple
    strides: tuple
    block: tuple
    fields: dict | None = None


def kv_descriptor_why_not(t3: Tensor, pat: Pattern) -> str | None:
    """Why the tiled kernels cannot read ``t3`` (a canonical 6-D view of an operand they walk) through a tensor
    descriptor, or None when it can. TMA wants 16-byte aligned strides and base, a contiguous last dim and at most
    5 dims, so the batch folds into the first spatial dim only where one of them is 1 (a box never crosses items)."""
    if KV_DESCRIPTORS is False:
        return "switched off (VISATTN_KV_DESC=0)"
    if any(d != 1 for d in pat.dilation):
        return "dilation: a dilation group is a strided sub-grid"
    B, L0 = t3.shape[:2]
    if B > 1 and L0 > 1:
        return "3-D map with batch > 1: the 6-D view exceeds TMA's 5 dims"
    size = t3.element_size()
    if t3.stride(-1) != 1 or t3.data_ptr() % 16 or any(s * size % 16 for s in t3.stride()[:-1]):
        return "strides or base not 16-byte aligned, or head dim not contiguous"
    if TensorDescriptor is None:
        return "this Triton has no host tensor descriptors (triton.tools.tensor_descriptor)"
    if INTERPRETED:
        if not KV_DESC_INTERPRETED:
            return "the interpreter runs pointer loads (test hook: ops.KV_DESC_INTERPRETED)"
    else:
        major = torch.cuda.get_device_capability(t3.device)[0] if t3.device.type == "cuda" else 0
        if major < 9:
            return "tensor descriptors need compute capability 9.0 or newer"
        if KV_DESCRIPTORS is None and major != 9:
            return "on by default on Hopper (sm90) only, where they were timed and swept (opt in: VISATTN_KV_DESC=1)"
        if KV_DESCRIPTORS is None and t3.shape[-1] <= KV_DESC_POINTER_HEAD_DIM:
            return (f"head_dim <= {KV_DESC_POINTER_HEAD_DIM}: pointer loads are as fast on the GPU and cost less "
                    f"host time per launch (opt in: VISATTN_KV_DESC=1)")
    return None


def kv_descriptor(t3: Tensor, box: tuple, block_d: int) -> KVDescriptor:
    """The descriptor view of a canonical 6-D view ``t3`` that ``kv_descriptor_why_not`` accepted, whose block is
    one ``box`` of rows (the walked tiles' box) by ``block_d`` columns."""
    B, L0, L1, L2, H, D = t3.shape
    sb, s0, s1, s2, sh, sd = t3.stride()
    shape, strides, block = (B * L0, L1, L2, H, D), (sb if L0 == 1 else s0, s1, s2, sh, sd), (*box, 1, block_d)
    built = getattr(TensorDescriptor(t3, list(shape), list(strides), list(block)), "__dict__", {})  # validated
    fields = {name: value for name, value in built.items() if name != "base"} if "base" in built else None
    return KVDescriptor(shape, strides, block, fields)


def _descriptor_views(a3: Tensor, b3: Tensor, pat: Pattern, box: tuple, block_a: int,
                      block_b: int) -> tuple | None:
    """The two ``KVDescriptor`` views of a pass's walked operands (canonical 6-D views ``a3``, ``b3``, one ``box``
    of rows by ``block_a`` / ``block_b`` columns), or None when either keeps pointer loads."""
    if kv_descriptor_why_not(a3, pat) is not None or kv_descriptor_why_not(b3, pat) is not None:
        return None
    return kv_descriptor(a3, box, block_a), kv_descriptor(b3, box, block_b)


def _descriptors(views: tuple, a: Tensor, b: Tensor) -> tuple:
    """Tensor descriptors of ``a`` and ``b`` through the two ``KVDescriptor`` views of a plan (made per call: a
    descriptor holds the tensor's address)."""
    return _descriptor(a, views[0]), _descriptor(b, views[1])


# Triton's constructor re-checks shapes, strides, block and base alignment on every call (~8 us of host time each
# on an H100's host, two per pass), all of which the plan key fixes (shape, strides, dtype and 16-byte alignment);
# so a call copies the fields its plan's view validated once. False: Triton's constructor every call (the A/B of
# benchmarks/bench_host_time.py --no-descriptor-reuse).
DESCRIPTOR_FIELD_REUSE = True


def _descriptor(t: Tensor, view: KVDescriptor):
    """A ``TensorDescriptor`` of ``t`` through ``view``: a copy of the view's validated fields with ``t`` as the
    base, or built by Triton where the view has none (or the reuse is switched off)."""
    if view.fields is None or not DESCRIPTOR_FIELD_REUSE:
        return TensorDescriptor(t, list(view.shape), list(view.strides), list(view.block))
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(view.fields)
    desc.base = t
    return desc


# Where the dK/dV pass reads its query boxes' LSE and delta on the descriptor path (head_dim > 32, Hopper): "rows"
# from the [B, *spatial, heads] tensors by per-element pointer (16 per thread, replicated, with 3-D index math:
# about a fifth of the loop's sm90 instructions at FLUX-4K), "pointer" from a head-major copy by one scalar plus a
# loop-invariant offset, "descriptor" from that copy through TMA (benchmarks/bench_dkv_stats.py times the three).
DKV_STATS = os.environ.get("VISATTN_DKV_STATS", "rows")
_DKV_STATS_MODES = {"rows": 0, "pointer": 1, "descriptor": 2}
if DKV_STATS not in _DKV_STATS_MODES:
    raise ValueError(f"VISATTN_DKV_STATS={DKV_STATS!r}: choose one of {', '.join(_DKV_STATS_MODES)}")


def _row_stats_view(batch: int, heads: int, lengths: tuple, box: tuple) -> KVDescriptor:
    """The descriptor view through which the dK/dV pass reads its query boxes' LSE and delta: a head-major copy
    ``[B * heads, L0, L1, L2, 4]`` (``_row_stats``), block ``(1, *box, 4)`` (asked for only where the pass's query
    boxes take descriptors, so host descriptors exist). Built per call, without field reuse: only the base
    changes, and at the sizes that take this path (head_dim > 32) the ~8 us constructor is noise."""
    L0, L1, L2 = lengths
    return KVDescriptor((batch * heads, L0, L1, L2, 4), (L0 * L1 * L2 * 4, L1 * L2 * 4, L2 * 4, 4, 1),
                        (1, *box, 4))


def _row_stats(lse: Tensor, delta: Tensor) -> Tensor:
    """LSE and delta ``[B, *spatial, heads]`` as ``[B, heads, L0, L1, L2, 4]`` (LSE, delta, LSE, delta per query),
    contiguous: a query's 16 bytes make one TMA box row (float32 boxes narrower than 16 bytes, or starting off a
    16-byte boundary, are not allowed)."""
    rank = lse.dim() - 2
    l3, d3 = _view3(lse, rank), _view3(delta, rank)
    return torch.stack((l3, d3, l3, d3), -1).permute(0, 4, 1, 2, 3, 5).contiguous()


class _ForwardPlan(NamedTuple):
    launch: LaunchRecord
    out_shape: tuple
    lse_shape: tuple
    cells: bool = False  # the small-map kernel (cells.py) rather than the tiled one
    expand: LaunchRecord | None = None  # the bias's expansion (bias tiles), launched before the forward
    bias_shape: tuple = ()
    bias_dtype: torch.dtype | None = None
    kv_desc: tuple | None = None  # (keys, values) KVDescriptor: the forward loads key boxes through TMA
    dual_out: bool = False  # a float32 output plus its 16-bit copy, both stored by the forward kernel


def _forward_plan(q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float,
                  out_dtype: torch.dtype | None = None) -> _ForwardPlan:
    rank, (q3, k3, v3), B, lengths, H, D, Dv, out_shape, lse_shape = _forward_shapes(q, k, v)
    layout = _tile_layout_of(q, v, rpb, extra_k, pat)
    # with bias tiles the forward walks the dQ pass's tiles, so both read one expansion
    tiles = layout.q_tiles if layout else _tiles("fwd", pat, lengths, q.dtype, max(D, Dv), bias=rpb is not None)
    n_tiles = _tiles_per_group(pat, lengths, tiles.m)
    r_st = (0,) * 4 if rpb is None else _rpb3(rpb, rank).stride()
    ek_st = (0,) * 4 if extra_k is None else extra_k.stride()
    ev_st = (0,) * 4 if extra_v is None else extra_v.stride()
    grid = (math.prod(pat.dilation[i] * n_tiles[i] for i in range(3)), B * H)
    scalars = (*q3.stride(), *k3.stride(), *v3.stride(), *_view3_strides(out_shape, rank)[:5],
               *_view3_strides(lse_shape, rank)[:4], *r_st, *ek_st, *ev_st,
               H, *_pattern_args(pat, lengths, n_tiles),
               0 if extra_k is None else extra_k.shape[1], layout.q_walk if layout else 1, scale * _LOG2E, D, Dv)
    constexprs, warps, stages = _split_options(_pattern_constexprs(pat, tiles, D, Dv, q.dtype))
    kv_desc = _descriptor_views(k3, v3, pat, tiles.n, constexprs["BLOCK_D"], constexprs["BLOCK_DV"])
    dual_out = out_dtype == torch.float32 and q.dtype != torch.float32
    constexprs.update(HAS_RPB=rpb is not None and layout is None, HAS_EXTRA=extra_k is not None,
                      BIAS_TILES=layout is not None, KV_DESC=kv_desc is not None, DUAL_OUT=dual_out)
    launch = _FWD.record(grid, 12, scalars, constexprs, warps, stages)
    if layout is None:
        return _ForwardPlan(launch, out_shape, lse_shape, kv_desc=kv_desc, dual_out=dual_out)
    return _ForwardPlan(launch, out_shape, lse_shape, False, _expand_query_record(pat, lengths, layout, r_st, H),
                        layout.q_shape(H), layout.dtype, kv_desc, dual_out)


def forward(q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float,
            out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; returns the output (contiguous, ``out_dtype`` or q's) and the log2-LSE
    ``[B, *spatial, heads]``. Launched from a plan cached per geometry (``launch.py``)."""
    return _forward(q, k, v, rpb, extra_k, extra_v, pat, scale, out_dtype)[:2]


def _forward(q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float,
             out_dtype: torch.dtype | None = None, plan: _ForwardPlan | None = None, lse: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``forward`` plus the bias expanded into the forward / dQ walk's tiles (None without bias tiles), which the
    eager backward reuses instead of expanding the same table again, and the output in q's 16-bit dtype where a
    float32 output was asked of the tiled kernel (stored by the same launch; else None). ``plan``: this geometry's
    plan, when the caller holds it (a ``PreparedCall``), which skips the lookup; ``lse``: a buffer to write the LSE
    into."""
    if plan is None:
        plan = _forward_plan_of(q, k, v, rpb, extra_k, extra_v, pat, scale, out_dtype)
    out = _new(plan.out_shape, q, out_dtype)
    if lse is None:
        lse = _new(plan.lse_shape, q, torch.float32)
    if plan.cells:
        _CELL_FWD(plan.launch, (q, k, v, out, lse, q if rpb is None else rpb))
        return out, lse, None, None
    bias = None
    if plan.expand is not None:
        bias = torch.empty(plan.bias_shape, device=q.device, dtype=plan.bias_dtype)
        _EXPAND_Q(plan.expand, (rpb, bias))
    kd, vd = (q, q) if plan.kv_desc is None else _descriptors(plan.kv_desc, k, v)
    out_low = _new(plan.out_shape, q) if plan.dual_out else None
    _FWD(plan.launch, (q, k, v, out, lse, q if rpb is None else rpb, q if extra_k is None else extra_k,
                       q if extra_v is None else extra_v, q if bias is None else bias, kd, vd,
                       out if out_low is None else out_low))
    return out, lse, bias, out_low


def _forward_plan_of(q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float,
                     out_dtype: torch.dtype | None) -> _ForwardPlan:
    """The cached forward plan of a call's geometry, made on its first call."""
    # the output dtype is part of the key: the compiled kernel is specialised on its output pointer's type
    key = ("fwd", pat, scale, out_dtype, *_path_flags(), q.device,
           tensor_key(q), tensor_key(k), tensor_key(v),
           tensor_key(rpb), tensor_key(extra_k), tensor_key(extra_v))
    plan = _PLANS.get(key)
    if plan is None:
        cb = engine_path(q, v, rpb, extra_k, pat)
        plan = _remember_plan(key, _cell_forward_plan(q, k, v, rpb, pat, scale, cb) if cb.box else
                              _forward_plan(q, k, v, rpb, extra_k, extra_v, pat, scale, out_dtype))
    return plan


def _path_flags() -> tuple:
    """The module switches a plan depends on (test hooks and escape hatches)."""
    return SMALL_MAP, KV_DESCRIPTORS, KV_DESC_INTERPRETED, DKV_STATS


# The per-pair dS buffer of the rpb gradient (used where the in-register bins cannot: rank 1 and 3) is float32
# [B, H, positions, prod(kernel)]; batches whose buffer would exceed this run the dQ pass in batch chunks.
_DSN_BYTES = 1 << 30


def _reduce_rpb_grad(dsn: Tensor, pat: Pattern, lengths, heads: int) -> Tensor:
    """drpb [H, 2K0-1, 2K1-1, 2K2-1] from the dS buffer: sum over batch, then over the positions sharing an offset
    class as a matmul with the one-hot map (deterministic, no atomics): the joint map of all dimensions where it is
    small (two launches; the host time of the six-launch chain cost more than its GPU time at 14x14), else one
    dimension at a time."""
    k0, k1, k2 = pat.kernel
    joint = rpb_joint_map(pat, lengths, dsn.device)
    if joint is not None:
        return (dsn.sum(0).view(heads, -1) @ joint).view(heads, 2 * k0 - 1, 2 * k1 - 1, 2 * k2 - 1)
    x_len, y_len, z_len = lengths
    w0, w1, w2 = rpb_offset_maps(pat, lengths, dsn.device)
    s = dsn.sum(0).view(heads, x_len, y_len, z_len, k0, k1, k2)
    s = s.permute(0, 2, 3, 5, 6, 1, 4).reshape(-1, x_len * k0) @ w0.view(x_len * k0, -1)  # [H,Y,Z,B,C,R]
    s = s.view(heads, y_len, z_len, k1, k2, -1).permute(0, 2, 4, 5, 1, 3).reshape(-1, y_len * k1)
    s = s @ w1.view(y_len * k1, -1)  # [H,Z,C,R,S]
    s = s.view(heads, z_len, k2, 2 * k0 - 1, 2 * k1 - 1).permute(0, 3, 4, 1, 2).reshape(-1, z_len * k2)
    return (s @ w2.view(z_len * k2, -1)).view(heads, 2 * k0 - 1, 2 * k1 - 1, 2 * k2 - 1)


def _bins(kernel: int) -> int:
    """Padded number of relative offsets along one dimension (a power of two >= 16, tl.dot's minimum)."""
    return max(16, 1 << (2 * kernel - 2).bit_length())


class _BiasTilePlan(NamedTuple):
    """The extra launches of a backward with bias tiles: both expansions and the bias gradient."""

    expand_q: LaunchRecord
    expand_k: LaunchRecord
    grad: LaunchRecord | None  # None when the dQ pass writes the per-pair buffer ("tiles-dsn")
    q_shape: tuple
    k_shape: tuple
    dtype: torch.dtype


class _BackwardPlan(NamedTuple):
    dq: LaunchRecord
    dkv: LaunchRecord
    table: Tensor
    # "none", "bins" (in-register offset bins), "dsn" (per-pair buffer + host reduction), "tiles" (bias tiles,
    # recomputing gradient kernel), "tiles-dsn" (bias tiles, per-pair buffer)
    rpb_mode: str
    part_shape: tuple  # bins: [B, H, dQ programs, O1, O2]; tiles: [batch chunks, H, grad programs, O1, O2]
    n_programs: int
    tiles: _BiasTilePlan | None = None
    dq_desc: tuple | None = None  # (keys, values) KVDescriptor of the dQ pass
    dkv_desc: tuple | None = None  # (queries, output gradients) KVDescriptor of the dK/dV pass
    stats_desc: KVDescriptor | None = None  # the dK/dV pass's LSE / delta boxes (``_row_stats_view``)


# Bias-gradient programs to keep at least (batch chunks are sized for it): a few per SM. Its loop over a chunk's
# items is pipelined over BIAS_GRAD_STAGES stages (H100, NAT-T s1-s3: 3 stages 25% faster than 1; 8 warps 2x slower).
BIAS_GRAD_PROGRAMS = 1024
# With bias tiles, the bias gradient from the dQ pass's dS, written once per pair into the per-position buffer and
# reduced on the host, instead of recomputed by _bias_grad_kernel: H100, NAT-T s3, all GPU time of a fwd+bwd 0.818 ->
# 0.767 ms, host reduction included (engine-h100-2026-12-06-run6-{baseline,dsn}.json). VISATTN_BIAS_GRAD_BUFFER=0:
# the recompute.
BIAS_GRAD_BUFFER = os.environ.get("VISATTN_BIAS_GRAD_BUFFER", "1") != "0"
BIAS_GRAD_STAGES = 3
BIAS_GRAD_WARPS = 4


def _backward_plan(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, pat: Pattern, scale: float,
                   grad_lse, grads: tuple | None = None) -> _BackwardPlan:
    rank = q.dim() - 3
    q3, k3, v3, do3, o3, l3 = (_view3(t, rank) for t in (q, k, v, grad_out, out, lse))
    B, L0, L1, L2, H, D = q3.shape
    Dv = v3.shape[-1]
    lengths = (L0, L1, L2)
    d_max = max(D, Dv)
    r_st = (0,) * 4 if rpb is None else _rpb3(rpb, rank).stride()
    ek_st = (0,) * 4 if extra_k is None else extra_k.stride()
    ev_st = (0,) * 4 if extra_v is None else extra_v.stride()
    dq_st, dk_st, dv_st = _grad_strides(q, k, v, grads)

    mode = "none"
    layout = _tile_layout_of(q, v, rpb, extra_k, pat)
    bins = rpb is not None and rank == 2
    tiles = layout.q_tiles if layout else _tiles("dq", pat, lengths, q.dtype, d_max, bins=bins)
    if layout is not None:
        mode = "tiles-dsn" if BIAS_GRAD_BUFFER else "tiles"
    elif rpb is not None:
        mode = "bins" if rank == 2 and binnable(tiles.m, tiles.n) else "dsn"
    n_tiles = _tiles_per_group(pat, lengths, tiles.m)
    n_programs = math.prod(pat.dilation[i] * n_tiles[i] for i in range(3))
    pattern_tail = _pattern_args(pat, lengths, n_tiles)
    o1, o2 = _bins(pat.kernel[1]), _bins(pat.kernel[2])
    scalars = (*q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *o3.stride()[:5],
               *dq_st, *l3.stride()[:4], *r_st, *ek_st, *ev_st,
               H, *pattern_tail, 0 if extra_k is None else extra_k.shape[1], layout.q_walk if layout else 1,
               scale * _LOG2E, scale, D, Dv)
    constexprs, warps, stages = _split_options(_pattern_constexprs(pat, tiles, D, Dv, q.dtype))
    if mode == "dsn" and not INTERPRETED:
        # triton 3.6 on an H100 pipelined this variant (the per-pair dS store in the key-tile loop) into a wrong dQ
        # and bias gradient: 3-D window, head_dim 64 (check-h100-2026-12-06-run4-failed.json; right unpipelined,
        # or at 2 or 8 warps: replay-h100-2026-12-06-variants.json). One stage costs little: ranks 1 and 3 only.
        stages = 1
    constexprs.update(HAS_RPB=rpb is not None and layout is None, HAS_EXTRA=extra_k is not None,
                      RPB_BINS=mode == "bins", O1=o1, O2=o2, HAS_GLSE=grad_lse is not None,
                      BIAS_TILES=layout is not None, DS_BUFFER=mode == "tiles-dsn")
    dq_desc = None  # not with the per-pair buffer, whose batch chunks launch on slices
    if mode not in ("dsn", "tiles-dsn"):
        dq_desc = _descriptor_views(k3, v3, pat, tiles.n, constexprs["BLOCK_D"], constexprs["BLOCK_DV"])
    constexprs["KV_DESC"] = dq_desc is not None
    dq = _DQ.record((n_programs, B * H), 16, scalars, constexprs, warps, stages)
    grad = None
    part_shape = (B, H, n_programs, o1, o2)
    if mode == "tiles":
        walk = layout.q_walk
        chunks = max(1, min(B, BIAS_GRAD_PROGRAMS // max(1, n_programs * walk * H)))
        per_chunk = triton_cdiv(B, chunks)
        chunks = triton_cdiv(B, per_chunk)
        g_scalars = (*q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *l3.stride()[:4], H, *pattern_tail,
                     walk, B, per_chunk, scale * _LOG2E, D, Dv)
        g_constexprs, _, _ = _split_options(_pattern_constexprs(pat, tiles, D, Dv, q.dtype))
        g_constexprs.update(O1=o1, O2=o2, BINS_PREC="ieee" if INTERPRETED else "tf32x3")
        grad = _BIAS_GRAD.record((n_programs * walk, H, chunks), 8, g_scalars, g_constexprs, BIAS_GRAD_WARPS,
                                 1 if INTERPRETED else BIAS_GRAD_STAGES)
        part_shape = (chunks, H, n_programs * walk, o1, o2)

    tiles = layout.k_tiles if layout else _tiles("dkv", pat, lengths, q.dtype, d_max)
    n_tiles = _tiles_per_group(pat, lengths, tiles.n)
    table = query_range_table(pat, lengths, n_tiles, tiles.n, q.device)
    scalars = (*q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *dk_st, *dv_st, *l3.stride()[:4], *r_st,
               H, *_pattern_args(pat, lengths, n_tiles), table.shape[1], layout.k_walk if layout else 1,
               scale * _LOG2E, scale, D, Dv)
    constexprs, warps, stages = _split_options(_pattern_constexprs(pat, tiles, D, Dv, q.dtype))
    # the dK/dV pass walks query boxes
    dkv_desc = _descriptor_views(q3, do3, pat, tiles.m, constexprs["BLOCK_D"], constexprs["BLOCK_DV"])
    stats_mode = 0 if dkv_desc is None else _DKV_STATS_MODES[DKV_STATS]
    if stats_mode == 1 and B * H * math.prod(lengths) * 4 >= 2**31:
        stats_mode = 0  # the pointer reads index the copy in int32: bigger copies keep the per-element reads
    stats_desc = _row_stats_view(B, H, lengths, tiles.m) if stats_mode == 2 else None
    constexprs.update(HAS_RPB=rpb is not None and layout is None, BIAS_TILES=layout is not None,
                      QDO_DESC=dkv_desc is not None, STATS=stats_mode)
    grid = (math.prod(pat.dilation[i] * n_tiles[i] for i in range(3)), B * H)
    dkv = _DKV.record(grid, 14, scalars, constexprs, warps, stages)
    if layout is None:
        return _BackwardPlan(dq, dkv, table, mode, part_shape, n_programs, None, dq_desc, dkv_desc, stats_desc)
    assert tiles == layout.k_tiles and grid[0] == layout.k_programs
    expand_k = _EXPAND_K.record((layout.k_programs, H), 3,
                                (*r_st, *_pattern_args(pat, lengths, n_tiles), table.shape[1], layout.k_walk),
                                _walk_constexprs(pat, tiles), 4, 1)
    bias_plan = _BiasTilePlan(_expand_query_record(pat, lengths, layout, r_st, H), expand_k, grad,
                              layout.q_shape(H), layout.k_shape(H), layout.dtype)
    return _BackwardPlan(dq, dkv, table, mode, part_shape, n_programs, bias_plan, dq_desc, dkv_desc, stats_desc)


def _backward_plan_of(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, pat: Pattern, scale: float,
                      grad_lse: Tensor | None, grads: tuple | None = None):
    """The cached backward plan of a call's geometry (a cell or a tiled plan), made on its first call. ``grads``:
    the (dq, dk, dv) tensors the kernels write, when the caller allocates them (else fresh contiguous ones)."""
    key = ("bwd", pat, scale, *_path_flags(), q.device, tensor_key(grad_out),
           tensor_key(q), tensor_key(k), tensor_key(v),
           tensor_key(out), tensor_key(lse), tensor_key(rpb), tensor_key(extra_k), tensor_key(extra_v),
           tensor_key(grad_lse), *((None,) if grads is None else (tensor_key(g) for g in grads)))
    plan = _PLANS.get(key)
    if plan is None:
        cb = engine_path(q, v, rpb, extra_k, pat)
        plan = _remember_plan(key, _cell_backward_plan(grad_out, q, k, v, lse, rpb, pat, scale, grad_lse, cb, grads)
                              if cb.box else _backward_plan(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, pat,
                                                            scale, grad_lse, grads))
    return plan


def backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, pat: Pattern, scale: float,
             grad_lse: Tensor | None = None, bias_q: Tensor | None = None, plan=None, grads: tuple | None = None):
    """dq, dk, dv, drpb (float32 or None), d extra_k, d extra_v (or None). ``bias_q``: the forward's expanded
    bias (``_forward``'s third output, same table), so the backward skips expanding it again. ``plan``: this
    geometry's backward plan when the caller holds it (a ``PreparedCall``). ``grads``: the (dq, dk, dv) tensors
    to write (views of one packed gradient; unit stride in the head dim), else fresh contiguous ones.

    Two launches (plus one reduction with a trained bias): the dQ pass, which also computes ``delta = rowsum(dO*O)``
    (shifted by the LSE gradient ``grad_lse`` of the log2-LSE output, when it was used) and stores it, then the
    dK/dV pass, which reads it. ``grad_out`` may have any strides."""
    if plan is None:
        plan = _backward_plan_of(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, pat, scale, grad_lse, grads)
    dq, dk, dv = (_new(q.shape, q), _new(k.shape, k), _new(v.shape, v)) if grads is None else grads
    if isinstance(plan, _CellBackwardPlan):
        drpb = None
        part = q
        if plan.part_shape is not None:
            part = torch.empty(plan.part_shape, device=q.device, dtype=torch.float32)
        _CELL_BWD(plan.launch, (q, k, v, grad_out, lse if grad_lse is None else grad_lse, lse, dq, dk, dv, part,
                                q if rpb is None else rpb))
        if plan.part_shape is not None:
            k1, k2 = pat.kernel[1], pat.kernel[2]
            drpb = part[:, :, :, : 2 * k1 - 1, : 2 * k2 - 1].sum((1, 2)).reshape(rpb.shape)
        return dq, dk, dv, drpb, None, None
    delta = _new(lse.shape, lse)
    glse = lse if grad_lse is None else grad_lse
    rpb_t = q if rpb is None else rpb
    ek = q if extra_k is None else extra_k
    ev = q if extra_v is None else extra_v
    drpb = None
    bias_k = q
    if plan.tiles is None:
        bias_q = q
    else:
        bt = plan.tiles
        if bias_q is None or bias_q.shape != bt.q_shape or bias_q.dtype != bt.dtype:
            bias_q = torch.empty(bt.q_shape, device=q.device, dtype=bt.dtype)
            _EXPAND_Q(bt.expand_q, (rpb, bias_q))
        bias_k = torch.empty(bt.k_shape, device=q.device, dtype=bt.dtype)
        _EXPAND_K(bt.expand_k, (rpb, bias_k, plan.table))
    if plan.rpb_mode in ("dsn", "tiles-dsn"):
        drpb = _dq_pass_with_dsn(plan, grad_out, q, k, v, out, glse, lse, delta, dq, rpb, ek, ev, pat, bias_q)
    else:
        part = q if plan.rpb_mode == "none" else torch.empty(plan.part_shape, device=q.device, dtype=torch.float32)
        kd, vd = (q, q) if plan.dq_desc is None else _descriptors(plan.dq_desc, k, v)
        _DQ(plan.dq, (q, k, v, grad_out, out, glse, lse, delta, dq, part, rpb_t, ek, ev, bias_q, kd, vd))
        if plan.tiles is not None:
            _BIAS_GRAD(plan.tiles.grad, (q, k, v, grad_out, lse, delta, bias_q, part))
        if plan.rpb_mode in ("bins", "tiles"):
            k1, k2 = pat.kernel[1], pat.kernel[2]
            drpb = part[:, :, :, : 2 * k1 - 1, : 2 * k2 - 1].sum((0, 2)).reshape(rpb.shape)
    qd, dod = (q, q) if plan.dkv_desc is None else _descriptors(plan.dkv_desc, q, grad_out)
    sd = q
    if plan.dkv.constexprs["STATS"]:
        sd = _row_stats(lse, delta)
        sd = sd if plan.stats_desc is None else _descriptor(sd, plan.stats_desc)
    _DKV(plan.dkv, (q, k, v, grad_out, lse, delta, dk, dv, rpb_t, plan.table, bias_k, qd, dod, sd))
    dek = dev = None
    if extra_k is not None:
        rank = q.dim() - 3
        q3, do3, l3 = (_view3(t, rank) for t in (q, grad_out, lse))
        B, L0, L1, L2, H, D = q3.shape
        Dv = v.shape[-1]
        n_extra = extra_k.shape[1]
        dek, dev = _new(extra_k.shape, extra_k), _new(extra_v.shape, extra_v)
        block = 16 if INTERPRETED else 64
        _bwd_extra_dkv_kernel[(triton_cdiv(n_extra, block), B * H)](
            q3, extra_k, extra_v, do3, l3, delta, dek, dev,
            *q3.stride(), *extra_k.stride(), *extra_v.stride(), *do3.stride(), *l3.stride()[:4],
            H, L1, L2, L0 * L1 * L2, n_extra, scale * _LOG2E, scale, D, Dv,
            BLOCK_M=32 if INTERPRETED else 64, BLOCK_N=block, BLOCK_D=padded_head_dim(D),
            BLOCK_DV=padded_head_dim(Dv), DOT_PREC=dot_precision(q.dtype),
            num_warps=4, num_stages=1 if INTERPRETED else 2,
        )
    return dq, dk, dv, drpb, dek, dev


def _dq_pass_with_dsn(plan: _BackwardPlan, grad_out, q, k, v, out, glse, lse, delta, dq, rpb, ek, ev,
                      pat: Pattern, bias: Tensor) -> Tensor:
    """The dQ pass for a bias the in-register bins do not take (rank 1 and 3, and bias tiles with
    ``BIAS_GRAD_BUFFER``; ``bias`` is then the expanded tiles, else unused): each pair's dS into a per-query
    neighbour buffer, reduced on the host (``_reduce_rpb_grad``); batch chunks bound the buffer. A single chunk
    replays the plan's launch; several go through Triton's normal path (their grids differ from the plan's)."""
    rank = q.dim() - 3
    B, H = q.shape[0], q.shape[-2]
    lengths = tuple(_view3(q, rank).shape[1:4])
    neighbours = math.prod(pat.kernel)
    chunk = max(1, min(B, _DSN_BYTES // (H * math.prod(lengths) * neighbours * 4)))
    # windows (partial at borders) and causal rows have fewer than prod(kernel) neighbours: zero their slots.
    alloc = torch.zeros if (pat.window or any(pat.causal)) else torch.empty
    drpb = None
    rec = plan.dq
    for b0 in range(0, B, chunk):
        nb = min(chunk, B - b0)
        dsn = alloc((nb, H, math.prod(lengths), neighbours), device=q.device, dtype=torch.float32)
        if nb == B:  # one chunk (the usual case): the plan's replayed launch on the whole tensors, no slicing
            _DQ(rec, (q, k, v, grad_out, out, glse, lse, delta, dq, dsn, rpb, ek, ev, bias, q, q))
        else:
            part = slice(b0, b0 + nb)
            tensors = (q[part], k[part], v[part], grad_out[part], out[part], glse[part], lse[part], delta[part],
                       dq[part], dsn, rpb, ek[part], ev[part], bias, q, q)
            _DQ.kernel[(rec.grid[0], nb * H)](*tensors, *rec.scalars, **rec.constexprs, **rec.options)
        part_grad = _reduce_rpb_grad(dsn, pat, lengths, H)
        drpb = part_grad if drpb is None else drpb + part_grad
    return drpb.reshape(rpb.shape)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------------------
# torch.library wrapping: one forward op and one backward op for every local pattern.
# ------------------------------------------------------------------------------------------------------------

_EMPTY = (0,)


def wants_fp32_out(q: Tensor, rpb: Tensor | None, v: Tensor | None = None, extra_k: Tensor | None = None,
                   pat: Pattern | None = None) -> bool:
    """Keep a float32 copy of the output for the tiled backward's delta = rowsum(dO * O)?

    FA2 takes delta from the stored 16-bit output. Its rounding error is independent per row, and the bias gradient
    sums dS over the whole map, where the true terms cancel: on the GPU sweep a bf16 d(rpb) came out 4% off
    (3% from rounding O alone, checked in float64). With a trained bias the output is kept in float32 as well.
    The small-map backward needs no copy: it takes delta = rowsum(P * dP) from the recomputed float32 P and dP."""
    if not (rpb is not None and rpb.requires_grad and torch.is_grad_enabled()
            and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return pat is None or v is None or engine_path(q, v, rpb, extra_k, pat).box is None


# The engine's ops for traced calls (what a compiled graph holds: opaque to Inductor, fake implementations for
# shapes). Each is one CompositeExplicitAutograd kernel, and autograd lives in an autograd.Function around the pair
# (_TracedLocalAttention, _TracedPackedLocalAttention) that dynamo traces: a torch.library.custom_op adds Python
# autograd and dispatch layers that a compiled graph pays on every call (32 us against 10 us per call for this
# signature with an empty body, on the CPU; docs/PERF.md, fifteenth round).
_LIB = torch.library.Library("visattn", "FRAGMENT")


def _define_op(name: str, schema: str, kernel, fake):
    """``visattn::<name>`` with ``kernel`` for every device (the Triton launchers pick the device) and ``fake`` for
    tracing; returns the op's overload."""
    _LIB.define(name + schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"visattn::{name}", fake, lib=_LIB)
    return getattr(torch.ops.visattn, name).default


def _op_forward(q, k, v, rpb, extra_k, extra_v, window, kernel, dilation, stride, causal, shift, scale,
                fp32_out=False) -> tuple[Tensor, Tensor, Tensor]:
    """``visattn::local_attention_fwd``: (output, log2-LSE, the output in float32 when ``fp32_out`` else empty)."""
    pat = _call_pattern(q, window, kernel, dilation, stride, causal, shift)  # cached: one call per layer per step
    if not fp32_out:
        return (*forward(q, k, v, rpb, extra_k, extra_v, pat, scale), q.new_empty(_EMPTY))
    out32, lse, _, out_low = _forward(q, k, v, rpb, extra_k, extra_v, pat, scale, torch.float32)
    return (out32.to(q.dtype) if out_low is None else out_low), lse, out32


def _fake_forward(q, k, v, rpb, extra_k, extra_v, window, kernel, dilation, stride, causal, shift, scale,
                  fp32_out=False):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    out32 = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32) if fp32_out else q.new_empty(_EMPTY)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32), out32


def _op_backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, window, kernel, dilation, stride, causal,
                 shift, scale, grad_lse=None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``visattn::local_attention_bwd``: dq, dk, dv, drpb, d extra_k, d extra_v (absent ones as empty tensors: an
    op cannot return None)."""
    pat = _call_pattern(q, window, kernel, dilation, stride, causal, shift)
    dq, dk, dv, drpb, dek, dev = backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, pat, scale, grad_lse)
    drpb = q.new_empty(_EMPTY) if drpb is None else drpb.to(rpb.dtype)
    dek = q.new_empty(_EMPTY) if dek is None else dek
    dev = q.new_empty(_EMPTY) if dev is None else dev
    return dq, dk, dv, drpb, dek, dev


def _fake_backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, window, kernel, dilation, stride, causal,
                   shift, scale, grad_lse=None):
    def like(t):
        return q.new_empty(_EMPTY) if t is None else t.new_empty(t.shape)

    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(rpb), like(extra_k),
            like(extra_v))


_PATTERN_SCHEMA = "bool window, int[] kernel, int[] dilation, int[] stride, bool[] causal, int[] shift, float scale"
local_attention_fwd = _define_op(
    "local_attention_fwd", f"(Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor? extra_k, Tensor? extra_v, "
    f"{_PATTERN_SCHEMA}, bool fp32_out=False) -> (Tensor, Tensor, Tensor)", _op_forward, _fake_forward)
local_attention_bwd = _define_op(
    "local_attention_bwd", f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? rpb, "
    f"Tensor? extra_k, Tensor? extra_v, {_PATTERN_SCHEMA}, Tensor? grad_lse=None) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", _op_backward, _fake_backward)


# The packed-qkv pair for traced calls: Inductor cannot write an opaque op's dq, dk, dv into the stacked gradient
# of the unbind, so on the views a compiled graph copies the three into one tensor per call; these ops take the
# fused projection's qkv [B, *spatial, 3, heads, D] itself and the backward op writes one packed gradient.
def _op_packed_forward(qkv, rpb, window, kernel, dilation, stride, causal, shift, scale, fp32_out=False):
    """``visattn::local_attention_packed_fwd``: ``local_attention_fwd`` (no extra keys) on the views of ``qkv``."""
    q, k, v = qkv.unbind(-3)
    return _op_forward(q, k, v, rpb, None, None, window, kernel, dilation, stride, causal, shift, scale, fp32_out)


def _fake_packed_forward(qkv, rpb, window, kernel, dilation, stride, causal, shift, scale, fp32_out=False):
    q, k, v = qkv.unbind(-3)
    return _fake_forward(q, k, v, rpb, None, None, window, kernel, dilation, stride, causal, shift, scale, fp32_out)


def _op_packed_backward(grad_out, qkv, out, lse, rpb, window, kernel, dilation, stride, causal, shift, scale):
    """``visattn::local_attention_packed_bwd``: (the packed gradient of ``qkv``, the bias gradient or empty)."""
    q, k, v = qkv.unbind(-3)
    pat = _call_pattern(q, window, kernel, dilation, stride, causal, shift)
    grad_qkv = _new(qkv.shape, qkv)  # contiguous: the head dim has unit stride in each view
    drpb = backward(grad_out, q, k, v, out, lse, rpb, None, None, pat, scale, grads=grad_qkv.unbind(-3))[3]
    return grad_qkv, qkv.new_empty(_EMPTY) if drpb is None else drpb.to(rpb.dtype)


def _fake_packed_backward(grad_out, qkv, out, lse, rpb, window, kernel, dilation, stride, causal, shift, scale):
    return qkv.new_empty(qkv.shape), qkv.new_empty(_EMPTY) if rpb is None else rpb.new_empty(rpb.shape)


local_attention_packed_fwd = _define_op(
    "local_attention_packed_fwd", f"(Tensor qkv, Tensor? rpb, {_PATTERN_SCHEMA}, bool fp32_out=False) -> "
    "(Tensor, Tensor, Tensor)", _op_packed_forward, _fake_packed_forward)
local_attention_packed_bwd = _define_op(
    "local_attention_packed_bwd", f"(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor? rpb, "
    f"{_PATTERN_SCHEMA}) -> (Tensor, Tensor)", _op_packed_backward, _fake_packed_backward)


class _TracedLocalAttention(torch.autograd.Function):
    """Autograd of the traced ops: forward ``local_attention_fwd``, backward ``local_attention_bwd``. Outputs: the
    attention output and the log2-LSE; ``return_lse`` False marks the LSE non-differentiable (its zero gradient is
    then not passed on, and the backward skips the LSE term)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, extra_k, extra_v, window: bool, kernel: list, dilation: list, stride: list,
                causal: list, shift: list, scale: float, fp32_out: bool, return_lse: bool):
        out, lse, out32 = local_attention_fwd(q, k, v, rpb, extra_k, extra_v, window, kernel, dilation, stride,
                                              causal, shift, scale, fp32_out)
        ctx.save_for_backward(q, k, v, out32 if fp32_out else out, lse, rpb, extra_k, extra_v)
        ctx.pattern = (window, kernel, dilation, stride, causal, shift, scale)
        ctx.return_lse = return_lse
        if not return_lse:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, rpb, extra_k, extra_v = ctx.saved_tensors
        dq, dk, dv, drpb, dek, dev = local_attention_bwd(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v,
                                                         *ctx.pattern, grad_lse if ctx.return_lse else None)
        return (dq, dk, dv, None if rpb is None else drpb, None if extra_k is None else dek,
                None if extra_v is None else dev) + (None,) * 9


class _TracedPackedLocalAttention(torch.autograd.Function):
    """Autograd of the traced packed ops (``local_attention_packed_fwd/bwd``): one packed gradient for ``qkv``."""

    @staticmethod
    def forward(ctx, qkv, rpb, window: bool, kernel: list, dilation: list, stride: list, causal: list,
                shift: list, scale: float, fp32_out: bool):
        out, lse, out32 = local_attention_packed_fwd(qkv, rpb, window, kernel, dilation, stride, causal, shift,
                                                     scale, fp32_out)
        ctx.save_for_backward(qkv, out32 if fp32_out else out, lse, rpb)
        ctx.pattern = (window, kernel, dilation, stride, causal, shift, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, rpb = ctx.saved_tensors
        grad_qkv, drpb = local_attention_packed_bwd(grad_out, qkv, out, lse, rpb, *ctx.pattern)
        return (grad_qkv, None if rpb is None else drpb) + (None,) * 8


def _autograd_forward(ctx, q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float, fp32_out: bool,
                      prepared: PreparedCall | None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward both autograd Functions run: ``(returned, out, lse)``, the output they return (16-bit where q
    is), the output the backward reads (float32 where ``fp32_out``) and the log2-LSE. Sets the context's pattern,
    scale, prepared call and the expanded bias the backward reuses; the caller saves its own inputs."""
    out, lse, bias, out_low = _forward(q, k, v, rpb, extra_k, extra_v, pat, scale,
                                       torch.float32 if fp32_out else None, None if prepared is None else prepared.plan)
    ctx.pattern, ctx.scale, ctx.prepared = pat, scale, prepared
    ctx.bias_q = bias if rpb is not None and rpb.requires_grad else None  # autograd checks rpb's version
    ctx.set_materialize_grads(False)  # an unused LSE costs nothing in the backward
    returned = out_low if out_low is not None else (out.to(q.dtype) if fp32_out else out)
    return returned, out, lse


def _autograd_backward(ctx, grad_out, grad_lse, q, k, v, out, lse, rpb, extra_k, extra_v, grads=None) -> tuple:
    """The backward both autograd Functions run: ``backward``'s six results, with the prepared call's plan where
    there is one and the bias gradient in the table's dtype. ``grads``: ``backward``'s (dq, dk, dv) to write."""
    if grad_out is None:
        grad_out = torch.zeros(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    plan = None
    if ctx.prepared is not None:
        plan = ctx.prepared.backward_plan(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, grad_lse, grads)
    dq, dk, dv, drpb, dek, dev = backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, ctx.pattern, ctx.scale,
                                          grad_lse, ctx.bias_q, plan, grads)
    ctx.bias_q = None
    if drpb is not None:
        drpb = drpb.to(rpb.dtype)
    return dq, dk, dv, drpb, dek, dev


class _LocalAttention(torch.autograd.Function):
    """The same forward/backward as the custom op, for eager mode: ``torch.library`` dispatch (schema checks,
    default filling, alias checks, redispatch) cost about as much host time per call as the kernels' GPU time at
    NAT-T's 7x7 stage, so eager calls skip it; traced calls use the op (``local_attention``). Outputs: the
    attention output and the log2-LSE (both differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float, fp32_out: bool,
                prepared: PreparedCall | None = None):
        returned, out, lse = _autograd_forward(ctx, q, k, v, rpb, extra_k, extra_v, pat, scale, fp32_out, prepared)
        ctx.save_for_backward(q, k, v, out, lse, rpb, extra_k, extra_v)
        return returned, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return (*_autograd_backward(ctx, grad_out, grad_lse, *ctx.saved_tensors), None, None, None, None)


class _PackedLocalAttention(torch.autograd.Function):
    """``_LocalAttention`` on one packed ``qkv`` ``[B, *spatial, 3, heads, D]`` (a fused projection's output; q, k, v
    are its views along dim -3). The backward writes dq, dk, dv into one packed gradient: on the three views,
    autograd's unbind backward stacks them in three more copy kernels (103 us at NAT-T's 14x14 stage, B256, H100:
    profiler-trace-nat-s3-h100-2026-12-07-run6.json). Output: the attention output (16-bit where q is)."""

    @staticmethod
    def forward(ctx, qkv, rpb, pat: Pattern, scale: float, fp32_out: bool, prepared: PreparedCall | None = None):
        returned, out, lse = _autograd_forward(ctx, *qkv.unbind(-3), rpb, None, None, pat, scale, fp32_out, prepared)
        ctx.save_for_backward(qkv, out, lse, rpb)
        ctx.mark_non_differentiable(lse)
        return returned, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        qkv, out, lse, rpb = ctx.saved_tensors
        grad_qkv = _new(qkv.shape, qkv)  # contiguous: the head dim has unit stride in each view
        drpb = _autograd_backward(ctx, grad_out, None, *qkv.unbind(-3), out, lse, rpb, None, None,
                                  grad_qkv.unbind(-3))[3]
        return grad_qkv, drpb, None, None, None, None


def local_attention_packed(qkv: Tensor, rpb: Tensor | None, window: bool, kernel: tuple, dilation: tuple,
                           stride: tuple, causal: tuple, shift: tuple, scale: float,
                           prepared: PreparedCall | None = None) -> Tensor:
    """Local attention (no extra keys) of the three views of a packed ``qkv`` ``[B, *spatial, 3, heads, D]``, as
    ``local_attention(*qkv.unbind(-3), ...)`` returns it. Eager calls differentiate ``qkv`` as one tensor
    (``_PackedLocalAttention``); traced calls take the packed ops (``local_attention_packed_fwd/bwd``).
    ``prepared``: this geometry's ``PreparedCall`` (made on the views by ``prepare``), whose forward plan and
    backward plans a repeated call replays."""
    if prepared is not None and not prepared.retired and not torch.compiler.is_compiling():
        out, _ = _PackedLocalAttention.apply(qkv, rpb, prepared.pat, prepared.scale, prepared.fp32_out, prepared)
        return out
    q, k, v = qkv.unbind(-3)
    pat = _call_pattern(q, window, kernel, dilation, stride, causal, shift)
    fp32_out = wants_fp32_out(q, rpb, v, None, pat)
    if torch.compiler.is_compiling():
        return _TracedPackedLocalAttention.apply(qkv, rpb, window, list(kernel), list(dilation), list(stride),
                                                 [bool(c) for c in causal], list(shift), float(scale), fp32_out)
    out, _ = _PackedLocalAttention.apply(qkv, rpb, pat, float(scale), fp32_out)
    return out


@functools.lru_cache(maxsize=1024)
def _cached_pattern(rank, window, kernel, dilation, stride, causal, shift) -> Pattern:
    return make_pattern(rank, window, kernel, dilation, stride, causal, shift)


def _call_pattern(q: Tensor, window: bool, kernel, dilation, stride, causal, shift) -> Pattern:
    return _cache_unless_tracing(_cached_pattern)(q.dim() - 3, window, tuple(kernel), tuple(dilation),
                                                  tuple(stride), tuple(bool(c) for c in causal), tuple(shift))


def local_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, extra_k: Tensor | None,
                    extra_v: Tensor | None, window: bool, kernel: tuple, dilation: tuple, stride: tuple,
                    causal: tuple, shift: tuple, scale: float, return_lse: bool = False):
    """The engine for one call: the registered ops while ``torch.compile`` traces (opaque to Inductor, with their
    fakes; autograd through ``_TracedLocalAttention``), the equivalent ``autograd.Function`` in eager mode. With
    ``return_lse`` also the natural-log LSE ``[B, *spatial, heads]`` (float32), differentiable."""
    pat = _call_pattern(q, window, kernel, dilation, stride, causal, shift)
    fp32_out = wants_fp32_out(q, rpb, v, extra_k, pat)
    if torch.compiler.is_compiling():
        out, lse2 = _TracedLocalAttention.apply(q, k, v, rpb, extra_k, extra_v, window, list(kernel),
                                                list(dilation), list(stride), [bool(c) for c in causal], list(shift),
                                                float(scale), fp32_out, return_lse)
    else:
        out, lse2 = _LocalAttention.apply(q, k, v, rpb, extra_k, extra_v, pat, float(scale), fp32_out)
    return (out, lse2 * _LN2_RATIO) if return_lse else out


class PreparedCall:
    """One eager geometry of ``local_attention`` resolved once: pattern, float32-output choice, forward plan and
    whether autograd records the call. A model makes the same few calls every step; replaying a prepared call skips
    the pattern, path and plan lookups, and without gradients the ``autograd.Function`` as well (its host time was
    a quarter of a small-map forward's). The caller keys it by everything the plan depends on: shapes, strides,
    dtypes, device, 16-byte pointer alignment, ``requires_grad`` and the grad mode (``visattn.functional``)."""

    __slots__ = ("pat", "scale", "fp32_out", "return_lse", "plan", "autograd", "epoch", "flags", "scratch_lse",
                 "backward_plans")

    def __init__(self, q, k, v, rpb, extra_k, extra_v, pat: Pattern, scale: float, return_lse: bool):
        self.pat, self.scale, self.return_lse = pat, float(scale), return_lse
        self.fp32_out = wants_fp32_out(q, rpb, v, extra_k, pat)
        self.autograd = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rpb, extra_k, extra_v))
        self.epoch, self.flags = _PLANS.epoch, _path_flags()
        self.plan = _forward_plan_of(q, k, v, rpb, extra_k, extra_v, pat, self.scale,
                                     torch.float32 if self.fp32_out else None)
        # Where nothing reads the LSE (no gradient, not returned), every replay writes it into one buffer: an
        # allocation less per call, and concurrent writers of data nobody reads cannot change a result.
        self.scratch_lse = None
        self.backward_plans: dict = {}  # by the output gradient's and the LSE gradient's geometry
        if not (self.autograd or return_lse or POISON):
            self.scratch_lse = torch.empty(self.plan.lse_shape, device=q.device, dtype=torch.float32)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, extra_k: Tensor | None,
                 extra_v: Tensor | None):
        """The call's result, as ``local_attention`` returns it; None when the plan was retired (a cleared plan
        cache or a switched path flag), so the caller takes the full path."""
        if self.retired:
            return None
        if self.autograd:
            out, lse2 = _LocalAttention.apply(q, k, v, rpb, extra_k, extra_v, self.pat, self.scale, self.fp32_out,
                                              self)
        else:  # nothing to differentiate: fp32_out is False here (it needs a bias that requires grad)
            out, lse2, _, _ = _forward(q, k, v, rpb, extra_k, extra_v, self.pat, self.scale, None, self.plan,
                                       self.scratch_lse)
        return (out, lse2 * _LN2_RATIO) if self.return_lse else out

    @property
    def retired(self) -> bool:
        """Whether the plan cache was cleared or a path flag switched since this call was prepared (replaying it
        would run stale plans: the caller prepares the call again)."""
        return self.epoch != _PLANS.epoch or self.flags != _path_flags()

    def backward_plan(self, grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, grad_lse, grads=None):
        """The backward plan of a replayed call: the rest of its geometry is fixed by this call's key (the output
        and LSE are fresh allocations of the forward plan), so only the incoming gradients' geometry varies, and
        that of ``grads`` where the caller allocates dq, dk, dv (``_PackedLocalAttention``). None once retired
        (``backward`` then looks the plan up by the full key)."""
        if self.retired:
            return None
        key = (tensor_key(grad_out), tensor_key(grad_lse), *((None,) if grads is None else map(tensor_key, grads)))
        plan = self.backward_plans.get(key)
        if plan is None:
            plan = self.backward_plans[key] = _backward_plan_of(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v,
                                                                self.pat, self.scale, grad_lse, grads)
        return plan


def prepare(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, extra_k: Tensor | None, extra_v: Tensor | None,
            window: bool, kernel: tuple, dilation: tuple, stride: tuple, causal: tuple, shift: tuple, scale: float,
            return_lse: bool = False) -> PreparedCall | None:
    """A ``PreparedCall`` for this eager call's geometry (``local_attention``'s arguments), or None while tracing
    (the custom op runs there) or for fake tensors, whose scratch buffer a later real call must not meet
    (``caching.may_cache``)."""
    if not may_cache(q, k, v, rpb, extra_k, extra_v):
        return None
    pat = _call_pattern(q, window, kernel, dilation, stride, causal, shift)
    return PreparedCall(q, k, v, rpb, extra_k, extra_v, pat, scale, return_lse)
