"""DiT / HDiT blocks: attention choices against float64 brute-force oracles (tests/oracle.py), adaLN-Zero identity
at initialisation, causal time, RoPE relativity, token merge/split, and the named model family's sizes."""

from __future__ import annotations

import pytest
import torch
from oracle import dense_attention, na_mask, window_mask

from visattn.diffusion import (
    AxialRoPE,
    DiTBlock,
    HDiTBlock,
    LatentSelfAttention,
    TokenMerge,
    TokenSplit,
    create_dit,
    list_dits,
    sample_euler,
)


def qkv_of(attn: LatentSelfAttention, x: torch.Tensor):
    """q, k, v [B, N, heads, D] recomputed from the module's weights, in float64."""
    heads, dim = attn.num_heads, attn.dim
    qkv = x.reshape(x.shape[0], -1, dim) @ attn.qkv.weight.T + attn.qkv.bias
    return qkv.unflatten(-1, (3, heads, dim // heads)).unbind(-3)


def oracle_out(attn, x, mask):
    q, k, v = qkv_of(attn, x)
    out = dense_attention(q, k, v, mask=mask)
    return (out.flatten(-2) @ attn.proj.weight.T + attn.proj.bias).reshape(x.shape)


@pytest.mark.parametrize("grid, attention, kwargs, mask", [
    ((6, 7), "neighborhood", dict(kernel_size=(3, 5)), lambda g: na_mask(g, (3, 5))),
    ((6, 8), "neighborhood", dict(kernel_size=4, stride=2), lambda g: na_mask(g, 4, stride=2)),
    ((6, 8), "neighborhood", dict(kernel_size=3, dilation=2), lambda g: na_mask(g, 3, dilation=2)),
    ((6, 8), "window", dict(window_size=(3, 4), shift=(1, 2)), lambda g: window_mask(g, (3, 4), (1, 2))),
    ((3, 4, 5), "neighborhood", dict(kernel_size=(2, 3, 3)), lambda g: na_mask(g, (2, 3, 3))),
    ((5, 6), "dense", {}, lambda g: None),
], ids=["na2d", "gna", "dilated", "window-shift", "na3d", "dense"])
def test_self_attention_equals_masked_oracle(grid, attention, kwargs, mask):
    torch.manual_seed(0)
    attn = LatentSelfAttention(16, 2, attention, rank=len(grid), **kwargs).double()
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), oracle_out(attn, x, mask(grid)), atol=1e-10, rtol=1e-8)


def test_causal_time_dense_and_neighborhood():
    torch.manual_seed(1)
    grid = (4, 3, 5)
    frames = torch.arange(4).repeat_interleave(15)
    causal = frames[None, :] <= frames[:, None]
    x = torch.randn(1, *grid, 16, dtype=torch.float64)
    dense = LatentSelfAttention(16, 2, "dense", rank=3, causal_time=True).double()
    na = LatentSelfAttention(16, 2, "neighborhood", rank=3, causal_time=True, kernel_size=(2, 3, 3)).double()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), oracle_out(dense, x, causal), atol=1e-10, rtol=1e-8)
        want = oracle_out(na, x, na_mask(grid, (2, 3, 3), causal=(True, False, False)))
        torch.testing.assert_close(na(x), want, atol=1e-10, rtol=1e-8)
        later = x.clone()
        later[:, 2:] += 1.0  # frames 0-1 must not see frames 2-3
        torch.testing.assert_close(na(later)[:, :2], na(x)[:, :2], atol=1e-12, rtol=0)


def test_agent_attention_equals_pooled_formula():
    torch.manual_seed(2)
    attn = LatentSelfAttention(16, 2, "agent", agent_grid=(2, 3)).double()
    x = torch.randn(2, 6, 9, 16, dtype=torch.float64)
    q, k, v = qkv_of(attn, x)
    agents = q.reshape(2, 2, 3, 3, 3, 2, 8).mean(dim=(2, 4)).reshape(2, 6, 2, 8)  # 3x3 cells of the 6x9 map
    scale = 8**-0.5
    va = torch.einsum("bahn,bnhd->bahd", torch.softmax(torch.einsum("bahd,bnhd->bahn", agents, k) * scale, -1), v)
    out = torch.einsum("bnha,bahd->bnhd", torch.softmax(torch.einsum("bnhd,bahd->bnha", q, agents) * scale, -1), va)
    want = (out.flatten(-2) @ attn.proj.weight.T + attn.proj.bias).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, atol=1e-10, rtol=1e-8)


def test_dit_block_identity_at_init_and_full_kernel_is_dense():
    torch.manual_seed(3)
    x, c = torch.randn(2, 5, 7, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    dense = DiTBlock(32, 4, "dense").double()
    with torch.no_grad():
        assert torch.equal(dense(x, c), x)  # adaLN-Zero: zero gates
        for param in dense.adaLN_modulation.parameters():
            param.normal_(0, 0.2)
        for attention, kwargs in (("neighborhood", dict(kernel_size=(5, 7))), ("window", dict(window_size=(5, 7)))):
            other = DiTBlock(32, 4, attention, **kwargs).double()
            other.load_state_dict(dense.state_dict())
            torch.testing.assert_close(other(x, c), dense(x, c), atol=1e-10, rtol=1e-8)


def test_dit_block_cross_attention_and_errors():
    torch.manual_seed(4)
    block = DiTBlock(16, 2, "neighborhood", rank=3, cross_attention_dim=12, kernel_size=3)
    x, c = torch.randn(1, 3, 4, 5, 16), torch.randn(1, 16)
    text = torch.randn(1, 6, 12)
    assert torch.equal(block(x, c, text), x)  # fresh block: identity, cross-attention included (zero output proj)
    for param in (*block.adaLN_modulation.parameters(), *block.cross_attn.proj.parameters()):
        torch.nn.init.normal_(param, std=0.2)
    out = block(x, c, text)
    assert out.shape == x.shape
    assert not torch.allclose(out, block(x, c, text + 1))  # the text reaches the latents
    with pytest.raises(ValueError, match="context"):
        block(x, c)
    with pytest.raises(ValueError, match="kernel_size"):
        DiTBlock(16, 2, "neighborhood")
    with pytest.raises(ValueError, match="does not take"):
        DiTBlock(16, 2, "window", kernel_size=3, window_size=4)
    with pytest.raises(ValueError, match="causal_time"):
        DiTBlock(16, 2, "window", window_size=4, causal_time=True, rank=3)


def test_axial_rope_is_relative():
    """q·k after RoPE depends only on the offset between positions (shift the whole grid: same scores)."""
    torch.manual_seed(5)
    rope = AxialRoPE(12, 3)
    q, k = torch.randn(1, 1, 1, 1, 1, 12), torch.randn(1, 1, 1, 1, 1, 12)
    big_q, big_k = (t.expand(1, 4, 5, 6, 1, 12).double() for t in (q, k))
    rq, rk = rope(big_q), rope(big_k)
    score = lambda a, b: (rq[0, a[0], a[1], a[2], 0] * rk[0, b[0], b[1], b[2], 0]).sum()  # noqa: E731
    torch.testing.assert_close(score((0, 1, 2), (1, 3, 0)), score((2, 2, 3), (3, 4, 1)))
    assert not torch.allclose(score((0, 1, 2), (1, 3, 0)), score((0, 1, 2), (1, 3, 1)))


def test_hdit_block_and_token_merge_split():
    torch.manual_seed(6)
    x, c = torch.randn(2, 8, 6, 16), torch.randn(2, 24)
    for attention, kwargs in (("neighborhood", dict(kernel_size=3)), ("window", dict(window_size=2)),
                              ("agent", dict(agent_grid=2)), ("dense", {})):
        block = HDiTBlock(16, 2, attention, cond_dim=24, **kwargs)  # DiTBlock's argument order
        assert torch.equal(block(x, c), x)  # zero-initialised output projections
    assert HDiTBlock(16, 2, "dense").norm1.linear.in_features == 16  # cond_dim defaults to dim, as DiTBlock's c
    with pytest.raises(TypeError, match="attention"):
        HDiTBlock(16, 2, 24, "dense")  # the old (dim, num_heads, cond_dim, attention) order is refused, not misread
    with pytest.raises(ValueError, match="cond_dim"):
        HDiTBlock(16, 2, cond_dim=0)
    merge, split = TokenMerge(16, 32), TokenSplit(32, 16)
    merged = merge(x)
    assert merged.shape == (2, 4, 3, 32)
    # the merge concatenates each 2x2 block of tokens: check against an explicit gather
    want = torch.cat([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(merged, want @ merge.proj.weight.T)
    assert split(merged, x).shape == x.shape
    video = torch.randn(1, 3, 4, 6, 16)
    assert TokenMerge(16, 8, rank=3)(video).shape == (1, 3, 2, 3, 8)


def test_named_family_sizes_match_the_dit_paper():
    """DiT paper, Table 1 (and its released checkpoints): S/2 33M, B/2 130M, L/2 458M, XL/2 675M parameters."""
    want = {"dit_s_2": 33.0e6, "dit_b_2": 130.5e6, "dit_l_2": 458.1e6, "dit_xl_2": 675.1e6}
    for name, params in want.items():
        with torch.device("meta"):
            model = create_dit(name)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - params) / params < 0.01, (name, count)
    assert {"hdit_s", "hdit_b"} <= set(list_dits())
    with pytest.raises(ValueError, match="unknown model"):
        create_dit("dit_q_2")


class _LabelRecorder(torch.nn.Module):
    """A velocity model that records the labels it is called with (zero velocity)."""

    def __init__(self, num_classes: int | None):
        super().__init__()
        if num_classes is not None:
            self.y_embedder = torch.nn.Module()
            self.y_embedder.num_classes = num_classes
        self.labels: list[list[int]] = []

    def forward(self, x, t, y):
        self.labels.append(y.tolist())
        return torch.zeros_like(x)


def test_sample_euler_guidance_null_class():
    y = torch.tensor([0, 3])
    recorder = _LabelRecorder(num_classes=7)
    sample_euler(recorder, (2, 1, 4, 4), y, steps=2, guidance=2.0)
    assert recorder.labels == [[0, 3], [7, 7]] * 2  # default null_class: the model's y_embedder.num_classes
    recorder = _LabelRecorder(num_classes=7)
    sample_euler(recorder, (2, 1, 4, 4), y, steps=1, guidance=2.0, null_class=5)
    assert recorder.labels == [[0, 3], [5, 5]]
    recorder = _LabelRecorder(num_classes=None)
    sample_euler(recorder, (2, 1, 4, 4), y, steps=1)  # no guidance: no null label needed
    assert recorder.labels == [[0, 3]]
    with pytest.raises(ValueError, match="null_class"):
        sample_euler(recorder, (2, 1, 4, 4), y, steps=1, guidance=2.0)
    assert recorder.labels == [[0, 3]]  # refused before any model call
    with pytest.raises(TypeError, match="null_class"):
        sample_euler(recorder, (2, 1, 4, 4), y, steps=1, guidance=2.0, null_class=1.5)
