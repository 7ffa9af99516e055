"""Tile shapes: a small table of tile volumes per (dtype, head_dim, pass) plus a cached box-shape heuristic.

The volume table (rows per query tile, rows per key tile, warps, pipeline stages) fixes register and shared-memory
use; the box shape (how those rows are spread over the three spatial dimensions) is chosen per problem to
minimise the keys visited per useful query, which is what a local-attention kernel wastes. Chosen once per key
and cached: nothing is autotuned on a call.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch

Triple = tuple[int, int, int]


class Tiles(NamedTuple):
    m: Triple  # query box (rows per spatial dim); prod = BLOCK_M
    n: Triple  # key box; prod = BLOCK_N
    warps: int
    stages: int


# (pass, dtype bits, head-dim class, kernel class) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), measured on an
# H100 (docs/PERF.md, benchmarks/results/attn-tune-*.json). "small" kernels (<= 81 keys per query, NAT's 7x7) are
# bound by the elementwise work on visited keys (exp, masks); windows (Swin 7x7) ran 3x faster with 32-key tiles.
_VOLUMES = {
    ("fwd", 16, 64, "large"): (128, 64, 4, 3),
    ("fwd", 16, 128, "large"): (128, 128, 8, 3),
    ("fwd", 16, 256, "large"): (64, 32, 8, 2),
    ("fwd", 16, 64, "small"): (64, 64, 4, 2),
    ("fwd", 16, 128, "small"): (64, 64, 4, 3),
    ("fwd", 16, 256, "small"): (64, 32, 8, 2),
    ("fwd", 16, 64, "window"): (128, 32, 4, 3),
    ("fwd", 16, 128, "window"): (64, 32, 4, 3),
    ("fwd", 16, 256, "window"): (64, 32, 8, 2),
    ("bwd", 16, 64, "window"): (64, 32, 4, 2),
    ("bwd", 16, 128, "window"): (64, 32, 8, 2),
    ("bwd", 16, 256, "window"): (32, 32, 8, 1),
    ("bwd", 16, 64, "large"): (64, 64, 4, 2),
    # head_dim 128 backward at 4 warps, with a dK/dV entry of its own (it had taken this volume at 8 warps): H100,
    # FLUX-4K NA k80 dQ 41.7 -> 17.0 ms, dK/dV 62.2 -> 34.6 ms (tune-tiles-flux4k-h100-2026-12-07.json); FLUX
    # 1024^2 + text NA k21 fwd+bwd 2.010 -> 1.411 ms, below cuDNN's 1.752 (flux-text-profile-h100-2026-12-07-*.json).
    ("bwd", 16, 128, "large"): (64, 64, 4, 2),
    ("bwd", 16, 256, "large"): (32, 32, 8, 1),
    ("bwd", 16, 64, "small"): (64, 64, 4, 2),
    ("bwd", 16, 128, "small"): (64, 64, 8, 2),
    ("bwd", 16, 256, "small"): (32, 32, 8, 1),
    # dK/dV owns the key tile (BLOCK_N) and walks query tiles (BLOCK_M): on H200 at NAT-T stage 1/3 (head_dim 32)
    # 32 queries x 64 keys ran the pass in 1.01 / 0.26 ms against 2.10 / 0.43 ms with the dQ pass's 64 x 32
    # (benchmarks/results/engine-h200-2026-11-30-run2.json).
    # 2 warps (and the dQ pass at 64 x 64) were faster at NAT-T s1-s3 without a bias on an H100
    # (tune-tiles-h100-2026-12-06.json: dK/dV 0.826 -> 0.760 ms, dQ 0.492 -> 0.435 ms at s1).
    ("dkv", 16, 64, "small"): (32, 64, 2, 2),
    ("dkv", 16, 64, "window"): (32, 64, 4, 2),
    ("dkv", 16, 128, "large"): (64, 64, 4, 2),
}
for _key, _vol in list(_VOLUMES.items()):  # float32: half the rows (registers), ieee dots
    _VOLUMES[(_key[0], 32) + _key[2:]] = (max(16, _vol[0] // 2), max(16, _vol[1] // 2), 4, min(_vol[3], 2))
# A fused bias adds a gathered [BLOCK_M, BLOCK_N] tile per key tile. The 128x128x3-stage forward then needs 256 KiB
# of shared memory (H100: 227 KiB; seen in the GPU sweep), and the small-kernel 128x64 forward ran 20x slower than
# without the bias (NAT-T s1 at B256: 16.1 ms vs 0.65; 64x32x2 stages: 0.81 ms; docs/PERF.md), so bias runs get
# smaller tiles.
_BIAS_VOLUMES = {
    ("fwd", 16, 128, "large"): (128, 64, 8, 3),
    ("fwd", 16, 64, "small"): (64, 32, 4, 2),
    ("fwd", 16, 128, "small"): (64, 32, 4, 2),
    # Expanded bias tiles (bias_tiles.py; the forward walks the dQ tiles): one more tile load per key tile, which a
    # third pipeline stage hides; dK/dV ran fastest with 32x32 tiles at 2 warps (NAT-T s1-s3, H100:
    # tune-tiles-h100-2026-12-06.json, dQ 0.196 -> 0.181 ms and dK/dV 0.202 -> 0.164 ms at s3).
    ("bwd", 16, 64, "small"): (64, 32, 4, 3),
    ("dkv", 16, 64, "small"): (32, 32, 2, 2),
}
# Maps of at most SMALL_MAP_TOKENS tokens (per dilation group) without a bias: the forward is issue-bound at 25%
# occupancy there (ncu-timeline-nat-s3-h100-2026-12-07-run1.json), and 32 x 64 tiles at 2 warps ran faster on an
# H100 (tune-tiles-h100-2026-12-06.json, pointer loads: NAT-T s3 0.1061 -> 0.0966 ms, s2 0.2491 -> 0.2146; at s1,
# 56^2, 0.4177 -> 0.4401, so larger maps keep the table's volume).
SMALL_MAP_TOKENS = 1024
_SMALL_MAP_VOLUMES = {("fwd", 16, 64, "small"): (32, 64, 2, 2)}
_INTERPRETER_VOLUMES = {"fwd": (64, 32, 4, 1), "bwd": (64, 64, 4, 1)}


def set_volume(key: tuple, volume: tuple | None) -> None:
    """For tuners: set one volume entry in the main table and in every table that overrides it for this key (a
    fused bias, small maps), so the volume applies to every problem of the key; None removes the main entry (the
    dK/dV pass then takes the dQ pass's). Clears the tile caches."""
    if volume is None:
        _VOLUMES.pop(key, None)
    else:
        _VOLUMES[key] = volume
        for table in (_BIAS_VOLUMES, _SMALL_MAP_VOLUMES):
            if key in table:
                table[key] = volume
    choose_tiles.cache_clear()
    volume_key.cache_clear()


def volume_tables() -> tuple[dict, dict, dict]:
    """Copies of the three volume tables (main, bias, small maps), for a tuner to restore."""
    return dict(_VOLUMES), dict(_BIAS_VOLUMES), dict(_SMALL_MAP_VOLUMES)


def restore_volume_tables(saved: tuple[dict, dict, dict]) -> None:
    """Put back tables saved by ``volume_tables`` and clear the tile caches."""
    for table, copy in zip((_VOLUMES, _BIAS_VOLUMES, _SMALL_MAP_VOLUMES), saved, strict=True):
        table.clear()
        table.update(copy)
    choose_tiles.cache_clear()
    volume_key.cache_clear()


def padded_head_dim(head_dim: int) -> int:
    """Power-of-two block for the head dimension (tl.dot needs >= 16); extra columns are masked."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: exact for float32 inputs; half-precision inputs run on the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Agent attention (agent_attn.py): stage B holds every agent of a row in one tile; on the H200 padded agent tiles
# beyond 128 x 128 (agents x head dim) exceed shared memory (tests/kernels/test_agent_kernel_gpu.py).
MAX_AGENTS = 256
MAX_AGENT_TILE = 128 * 128


def agent_tiles(n_agents: int, head_d: int, head_dv: int, dtype: torch.dtype) -> dict:
    """Agent-attention tiles: agents padded to a power of two >= 16 (tl.dot); both head dims padded to one power of
    two (on the H200, triton 3.6 gave wrong results for BLOCK_D != BLOCK_DV with >= 64 agents); 64 tokens per step
    (32 in float32), halved when the agent tile alone passes 32 KiB (shared memory)."""
    block_a = padded_head_dim(n_agents)
    block_d = padded_head_dim(max(head_d, head_dv))
    tokens = 64 if dtype != torch.float32 else 32
    if block_a * block_d * (4 if dtype == torch.float32 else 2) > 32 * 1024:
        tokens //= 2
    return dict(BLOCK_A=block_a, BLOCK_D=block_d, BLOCK_DV=block_d, tokens=tokens)


def _boxes(volume: int) -> list[Triple]:
    """Every power-of-two box of the given volume."""
    e = int(math.log2(volume))
    return [(1 << a, 1 << b, 1 << (e - a - b)) for a in range(e + 1) for b in range(e + 1 - a)]


def _dim_cost(own: int, other: int, extent: int, kernel: int, stride: int, window: bool) -> tuple[float, float]:
    """(rows of the other tile visited, useful rows of own tile) along one dimension."""
    if window:  # own tiles are cut inside windows; the other side covers the whole window
        per_window = math.ceil(kernel / own)
        return math.ceil(kernel / other) * other, kernel / per_window
    if own % stride == 0 or stride % own == 0:  # tiles aligned with stride groups: leads step by `stride`
        reach = kernel + max(own - stride, 0)
    else:
        reach = kernel + own + stride - 2
    return math.ceil(min(reach, extent) / other) * other, min(own, extent)


def binnable(own: Triple, other: Triple) -> bool:
    """Whether a query box ``own`` against a key box ``other`` can have its dS binned into bias offsets in registers
    (``backward._rpb_bins``): flat in dimension 0, query x key rows >= 16 (tl.dot's minimum) in dimensions 1 and 2."""
    return own[0] == other[0] == 1 and own[1] * other[1] >= 16 and own[2] * other[2] >= 16


@functools.lru_cache(maxsize=512)
def volume_key(pass_name: str, window: bool, kernel: Triple, dtype_bits: int, head_dim: int) -> tuple:
    """The _VOLUMES entry a problem uses."""
    d_class = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    k_class = "window" if window else "small" if math.prod(kernel) <= 81 else "large"
    bits = 16 if dtype_bits == 16 else 32
    if pass_name == "dkv" and ("dkv", bits, d_class, k_class) in _VOLUMES:
        return ("dkv", bits, d_class, k_class)
    return ("fwd" if pass_name == "fwd" else "bwd", bits, d_class, k_class)


@functools.lru_cache(maxsize=512)
def choose_tiles(pass_name: str, window: bool, extents: Triple, kernel: Triple, stride: Triple, dtype_bits: int,
                 head_dim: int, interpret: bool, bias: bool = False, bins: bool = False) -> Tiles:
    """Tiles for one pass ('fwd', 'dq' or 'dkv'). extents: dilation-group lengths; kernel: kernel or window;
    bias: an rpb table is fused (it costs shared memory per pipeline stage); bins: the dQ pass sums the bias
    gradient in registers (``backward._rpb_bins``), whose one-hot products need boxes flat in dimension 0 with
    query x key rows >= 16 in dimensions 1 and 2 (when no box qualifies, the unconstrained choice is returned)."""
    if interpret:
        block_m, block_n, warps, stages = _INTERPRETER_VOLUMES["fwd" if pass_name == "fwd" else "bwd"]
    else:
        key = volume_key(pass_name, window, kernel, dtype_bits, head_dim)
        table = _BIAS_VOLUMES if bias and key in _BIAS_VOLUMES else _VOLUMES
        if not bias and key in _SMALL_MAP_VOLUMES and math.prod(extents) <= SMALL_MAP_TOKENS:
            table = _SMALL_MAP_VOLUMES
        block_m, block_n, warps, stages = table[key]
    # the dK/dV pass owns the key tile and walks query tiles: the same cost with the roles swapped.
    own_volume, other_volume = (block_n, block_m) if pass_name == "dkv" else (block_m, block_n)
    # Neighborhoods keep the table's volume (fewer, larger tiles reload fewer halo keys per row); windows may
    # shrink it (down to 16 rows, tl.dot's minimum) so that a 7x7 window is not padded to 128 rows.
    own_volumes = [v for v in (own_volume, own_volume // 2, own_volume // 4) if v >= 16 and (window or v == own_volume)]
    best, best_cost = None, float("inf")
    for volume in own_volumes:
        pairs = list(itertools.product(_boxes(volume), _boxes(other_volume)))
        if bins and any(binnable(own, other) for own, other in pairs):
            pairs = [(own, other) for own, other in pairs if binnable(own, other)]
        for own, other in pairs:
            visited, useful = 1.0, 1.0
            for i in range(3):
                v, u = _dim_cost(own[i], other[i], extents[i], kernel[i], stride[i], window)
                visited *= v
                useful *= u
            cost = volume * visited / useful  # work per useful row, whole tiles counted
            if cost < best_cost * (1 - 1e-3):
                best, best_cost = (own, other), cost
    own, other = best
    m, n = (other, own) if pass_name == "dkv" else (own, other)
    return Tiles(m, n, warps, stages)
