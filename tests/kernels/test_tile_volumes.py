"""The tile-volume rule for small maps (``tiles.SMALL_MAP_TOKENS``): a bias-free head_dim-32 forward on a map of at
most 1024 tokens per dilation group takes 32 x 64 tiles at 2 warps (faster on an H100 at NAT-T's 14x14 and 28x28
stages), while larger maps, a fused bias, the backward passes and the interpreter keep their volumes."""

from __future__ import annotations

import math

from visattn.kernels import tiles


def _volume(pass_name: str, side: int, *, bias: bool = False, interpret: bool = False, head_dim: int = 32):
    t = tiles.choose_tiles(pass_name, False, (1, side, side), (1, 7, 7), (1, 1, 1), 16, head_dim, interpret,
                           bias=bias)
    return math.prod(t.m), math.prod(t.n), t.warps, t.stages


def test_small_maps_take_the_small_map_forward_volume():
    assert _volume("fwd", 14) == (32, 64, 2, 2)
    assert _volume("fwd", 28) == (32, 64, 2, 2)
    assert _volume("fwd", 32) == (32, 64, 2, 2)  # 1024 tokens: still small


def test_larger_maps_biases_backward_and_interpreter_keep_their_volumes():
    table = tiles._VOLUMES[("fwd", 16, 64, "small")]
    assert _volume("fwd", 33) == table and _volume("fwd", 56) == table
    assert _volume("fwd", 14, bias=True) == tiles._BIAS_VOLUMES[("fwd", 16, 64, "small")]
    assert _volume("dq", 14) == tiles._VOLUMES[("bwd", 16, 64, "small")]
    assert _volume("dkv", 14) == tiles._VOLUMES[("dkv", 16, 64, "small")]
    assert _volume("fwd", 14, interpret=True) == tiles._INTERPRETER_VOLUMES["fwd"]
    assert _volume("fwd", 14, head_dim=128) == tiles._VOLUMES[("fwd", 16, 128, "small")]


def test_a_tuned_volume_reaches_every_table_holding_its_key_and_restores():
    """Tuners set a key through ``set_volume``: the small-map and bias tables that override the main one for that
    key take the volume too (else a tuner would time the override, not its candidate), and the saved tables come
    back whole."""
    key = ("fwd", 16, 64, "small")
    saved = tiles.volume_tables()
    try:
        tiles.set_volume(key, (16, 32, 4, 3))
        assert _volume("fwd", 14) == (16, 32, 4, 3) and _volume("fwd", 56) == (16, 32, 4, 3)
        assert _volume("fwd", 14, bias=True) == (16, 32, 4, 3)
    finally:
        tiles.restore_volume_tables(saved)
    assert _volume("fwd", 14) == (32, 64, 2, 2) and tiles.volume_tables() == saved
