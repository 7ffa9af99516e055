"""Training-free processor swaps on tiny randomly initialised diffusers models (float64, CPU).

Oracles: the stock model (a kernel covering the whole grid must reproduce it) and the stock processor handed an
explicit dense boolean mask built by tests/oracle.py from NATTEN's rules (a smaller kernel, GNA stride, dilation,
text tokens as global keys). AgentSD is checked against a float64 einsum written here from the method's formula.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from oracle import na_mask  # noqa: E402

from visattn.bench import dense  # noqa: E402
from visattn.diffusion import (  # noqa: E402
    AgentSDAttnProcessor,
    FluxNeighborhoodAttnProcessor,
    WanNeighborhoodAttnProcessor,
    patch,
    unpatch,
)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.double().eval()


def joint_mask(grid, text_tokens, text_first, **na) -> torch.Tensor:
    """[L, L] bool: image queries see their NA window plus all text; text queries see everything."""
    image = math.prod(grid)
    full = torch.ones(image + text_tokens, image + text_tokens, dtype=torch.bool)
    sl = slice(text_tokens, None) if text_first else slice(0, image)
    full[sl, sl] = na_mask(grid, **na)
    return full


class MaskedStock:
    """The stock processor with an extra dense mask ANDed into (or used as) its attention mask: the oracle."""

    def __init__(self, stock, mask: torch.Tensor):
        self.stock, self.mask = stock, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mask = self.mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask  # [B, 1, 1, L] key padding
        return self.stock(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def masked_oracle(model, inputs, attentions, mask):
    """The model's output with each attention module's stock processor given ``mask`` (restored afterwards)."""
    stock = [attention.processor for attention in attentions]
    for attention, proc in zip(attentions, stock, strict=True):
        attention.set_processor(MaskedStock(proc, mask))
    try:
        return run(model, inputs)
    finally:
        for attention, proc in zip(attentions, stock, strict=True):
            attention.set_processor(proc)


def assert_patched_equals(model, inputs, expected, **na):
    """``patch(model, **na)`` reproduces ``expected``; the model is unpatched afterwards whatever happens."""
    patch(model, **na)
    try:
        torch.testing.assert_close(run(model, inputs), expected, atol=1e-11, rtol=1e-9)
    finally:
        unpatch(model)


# ------------------------------------------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    model = randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), 0)
    gen = torch.Generator().manual_seed(1)
    height, width, text = 5, 7, 3
    ids = torch.zeros(height, width, 3, dtype=torch.float64)
    ids[..., 1] = torch.arange(height, dtype=torch.float64)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float64)[None, :]
    inputs = dict(hidden_states=torch.randn(2, height * width, 4, generator=gen, dtype=torch.float64),
                  encoder_hidden_states=torch.randn(2, text, 16, generator=gen, dtype=torch.float64),
                  pooled_projections=torch.randn(2, 8, generator=gen, dtype=torch.float64),
                  timestep=torch.tensor([0.3, 0.7], dtype=torch.float64), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(text, 3, dtype=torch.float64))
    return model, inputs, (height, width), text


def test_flux_full_kernel_equals_stock_and_unpatch_restores(flux):
    model, inputs, grid, _ = flux
    stock = run(model, inputs)
    before = dict(model.attn_processors)
    assert_patched_equals(model, inputs, stock, kernel_size=99)  # clamped to the 5x7 grid: dense attention
    assert all(model.attn_processors[name] is proc for name, proc in before.items())
    assert torch.equal(run(model, inputs), stock)


@pytest.mark.parametrize("na", [dict(kernel_size=(3, 5)), dict(kernel_size=(4, 4), stride=(2, 2)),
                                dict(kernel_size=(2, 3), dilation=(2, 2))], ids=["na", "gna", "dilated"])
def test_flux_small_kernel_equals_masked_oracle(flux, na):
    model, inputs, grid, text = flux
    full = {"dilation": 1, "stride": 1, "is_causal": False, **na}
    mask = joint_mask(grid, text, True, kernel=full["kernel_size"], dilation=full["dilation"],
                      stride=full["stride"], causal=False)
    attentions = [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
    assert len(attentions) == len(model.attn_processors)  # the oracle masks every attention the model has
    assert_patched_equals(model, inputs, masked_oracle(model, inputs, attentions, mask), **na)


def test_flux_hand_built_processor_with_fixed_grid(flux):
    """``set_attn_processor(FluxNeighborhoodAttnProcessor(..., grid=...))`` without patch(): the single-stream block's
    text length comes from the sequence length minus the grid (docs/DIFFUSION.md's hand-built use)."""
    model, inputs, grid, text = flux
    mask = joint_mask(grid, text, True, kernel=(3, 5), dilation=1, stride=1, causal=False)
    attentions = [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
    expected = masked_oracle(model, inputs, attentions, mask)
    before = dict(model.attn_processors)
    model.set_attn_processor(FluxNeighborhoodAttnProcessor(kernel_size=(3, 5), grid=grid))
    try:
        torch.testing.assert_close(run(model, inputs), expected, atol=1e-11, rtol=1e-9)
        model.set_attn_processor(FluxNeighborhoodAttnProcessor(kernel_size=3, grid=(9, 9)))  # 81 > 3 + 35 tokens
        with pytest.raises(ValueError, match="grid"):
            run(model, inputs)
    finally:
        model.set_attn_processor(before)


def test_flux_refusals(flux):
    model, inputs, _, _ = flux
    with pytest.raises(ValueError, match="kernel_size"):
        patch(model)
    patch(model, kernel_size=3)
    try:
        with pytest.raises(ValueError, match="already patched"):
            patch(model, kernel_size=3)
        bad = dict(inputs, img_ids=inputs["img_ids"].flip(0))
        with pytest.raises(ValueError, match="row-major"):
            run(model, bad)
    finally:
        unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    with pytest.raises(ValueError, match="does not know Linear"):
        patch(torch.nn.Linear(2, 2), kernel_size=3)
    wan_processor = WanNeighborhoodAttnProcessor(kernel_size=3, grid=(1, 5, 7))
    with pytest.raises(TypeError, match="WanAttention"):
        wan_processor(model.transformer_blocks[0].attn, torch.zeros(1, 35, 16))


def test_refuses_untested_diffusers(monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", "0.44.0")
    with pytest.raises(ValueError, match="0.44.0"):
        FluxNeighborhoodAttnProcessor(kernel_size=3)


# ------------------------------------------------------------------------------------------------ HunyuanVideo
@pytest.fixture(scope="module")
def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    model = randomize(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False), 2)
    gen = torch.Generator().manual_seed(3)
    text = 4
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the second prompt is padded
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 4, 5, generator=gen, dtype=torch.float64),
                  timestep=torch.tensor([300, 700]),
                  encoder_hidden_states=torch.randn(2, text, 16, generator=gen, dtype=torch.float64),
                  encoder_attention_mask=text_mask,
                  pooled_projections=torch.randn(2, 8, generator=gen, dtype=torch.float64))
    return model, inputs, (3, 4, 5), text


def test_hunyuan_full_kernel_equals_stock(hunyuan):
    model, inputs, grid, _ = hunyuan
    stock = run(model, inputs)
    assert_patched_equals(model, inputs, stock, kernel_size=grid)
    assert torch.equal(run(model, inputs), stock)


def test_hunyuan_small_kernel_padded_text_equals_masked_oracle(hunyuan):
    model, inputs, grid, text = hunyuan
    na = dict(kernel_size=(3, 3, 3), stride=(1, 2, 1))
    mask = joint_mask(grid, text, False, kernel=na["kernel_size"], stride=na["stride"])
    attentions = [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
    assert_patched_equals(model, inputs, masked_oracle(model, inputs, attentions, mask), **na)


# --------------------------------------------------------------------------------------------------------- Wan
@pytest.fixture(scope="module")
def wan():
    from diffusers import WanTransformer3DModel

    model = randomize(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32), 4)
    gen = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 10, 14, generator=gen, dtype=torch.float64),
                  timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=gen, dtype=torch.float64))
    return model, inputs, (3, 5, 7)


def test_wan_full_and_small_kernel(wan):
    model, inputs, grid = wan
    stock = run(model, inputs)
    assert_patched_equals(model, inputs, stock, kernel_size=grid)
    na = dict(kernel_size=(2, 3, 5), is_causal=(True, False, False))
    mask = na_mask(grid, na["kernel_size"], causal=na["is_causal"])
    oracle = masked_oracle(model, inputs, [block.attn1 for block in model.blocks], mask)
    assert_patched_equals(model, inputs, oracle, **na)
    assert torch.equal(run(model, inputs), stock)


# ------------------------------------------------------------------------------------ video patterns (issue 23)
def radial_token_mask(grid, block_size, decay_factor, attention_sink) -> torch.Tensor:
    """The released Radial block mask (transcription in visattn.bench.dense) expanded to [N, N] tokens."""
    frames, per = grid[0], grid[1] * grid[2]
    blocks = dense.radial_release_mask(frames, per, block_size, decay_factor, attention_sink)
    token_block = torch.arange(frames * per) // block_size
    return blocks[token_block][:, token_block]


def test_wan_sta_and_radial_equal_masked_oracle_and_stock_at_full_density(wan):
    model, inputs, grid = wan  # grid (3, 5, 7)
    stock = run(model, inputs)
    attn1 = [block.attn1 for block in model.blocks]
    assert_patched_equals(model, inputs, stock, attention="sta", tile_size=(1, 5, 7), kernel_tiles=(9, 9, 9))
    assert radial_token_mask(grid, 128, 1.0, True).all()  # 105 tokens in one (partial, dense) block
    assert_patched_equals(model, inputs, stock, attention="radial", block_size=128)
    tile, window = (1, 5, 1), (3, 1, 3)
    mask = dense.sliding_tile_mask(grid, tile, window)
    assert not mask.all()
    assert_patched_equals(model, inputs, masked_oracle(model, inputs, attn1, mask), attention="sta", tile_size=tile,
                          kernel_tiles=window)
    mask = radial_token_mask(grid, 4, 0.5, True)  # Wan: the first frame is an attention sink by default
    assert not mask.all()
    assert_patched_equals(model, inputs, masked_oracle(model, inputs, attn1, mask), attention="radial", block_size=4,
                          decay_factor=0.5)
    # Radial's release keeps its first layers dense: dense_blocks
    oracle = masked_oracle(model, inputs, attn1[1:], mask)
    assert_patched_equals(model, inputs, oracle, attention="radial", block_size=4, decay_factor=0.5, dense_blocks=1)
    assert torch.equal(run(model, inputs), stock)


def test_hunyuan_sta_and_radial_with_padded_text_equal_masked_oracle(hunyuan):
    model, inputs, grid, text = hunyuan  # grid (3, 4, 5), text last, the second prompt padded
    attentions = [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
    stock = run(model, inputs)
    assert_patched_equals(model, inputs, stock, attention="sta", tile_size=(1, 2, 5), kernel_tiles=(3, 3, 1))
    assert_patched_equals(model, inputs, stock, attention="vmoba", chunk_size=1, select_mode="topk", topk=3)
    for kwargs, image_mask in (
            (dict(tile_size=(1, 2, 5), kernel_tiles=(1, 1, 1)), dense.sliding_tile_mask(grid, (1, 2, 5), (1, 1, 1))),
            (dict(block_size=4, decay_factor=0.5), radial_token_mask(grid, 4, 0.5, False))):  # no sink by default
        assert not image_mask.all()
        video = math.prod(grid)
        mask = torch.ones(video + text, video + text, dtype=torch.bool)
        mask[:video, :video] = image_mask  # video rows: the pattern plus every valid text token; text rows: dense
        attention = "sta" if "tile_size" in kwargs else "radial"
        assert_patched_equals(model, inputs, masked_oracle(model, inputs, attentions, mask), attention=attention,
                              **kwargs)
    assert torch.equal(run(model, inputs), stock)


def test_wan_vmoba_cycles_chunks_per_block_and_matches_oracle(wan, monkeypatch):
    """VMoBA's selection depends on q and k inside the model, so the oracle works on what reaches the op: every
    call's inputs are recorded and its output checked against the dense VMoBA oracle; the chunk sizes cycle over the
    blocks (the layer-wise 1-D/2-D recurrence); at full density (top-3 of 3 chunks) it equals the stock model."""
    from visattn import functional

    model, inputs, grid = wan  # grid (3, 5, 7), 2 blocks
    stock = run(model, inputs)
    assert_patched_equals(model, inputs, stock, attention="vmoba", chunk_size=1, select_mode="topk", topk=3)
    calls = []
    real = functional.vmoba_attention

    def recording(q, k, v, *args, **kwargs):
        out = real(q, k, v, *args, **kwargs)
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), kwargs, out.detach().clone()))
        return out

    monkeypatch.setattr(functional, "vmoba_attention", recording)
    patch(model, attention="vmoba", chunk_size=[1, (1, 7)], threshold=0.3)
    try:
        run(model, inputs)
    finally:
        unpatch(model)
    assert [c[3]["chunk_size"] for c in calls] == [(1,), (1, 7)]
    picked = []
    for q, k, v, kwargs, out in calls:
        assert q.shape[1:4] == grid
        options = {name: kwargs[name] for name in ("select_mode", "topk", "threshold", "threshold_type")}
        ref, fraction = dense.vmoba(q, k, v, kwargs["chunk_size"], **options, return_selection=True)
        picked.append(fraction)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert all(0 < f < 1 for f in picked)
    assert torch.equal(run(model, inputs), stock)


def test_video_pattern_refusals(flux, wan):
    model, inputs, _ = wan
    with pytest.raises(ValueError, match="attention"):
        patch(flux[0], attention="radial")
    with pytest.raises(ValueError, match="kernel_size"):
        patch(model, attention="sta", kernel_size=3)
    with pytest.raises(TypeError, match="block_size"):
        patch(model, attention="sta", block_size=4)
    with pytest.raises(ValueError, match="decay_factor"):
        patch(model, attention="radial", decay_factor=0.0)
    with pytest.raises(ValueError, match="disagree"):
        patch(model, "sta", attention="radial")
    with pytest.raises(TypeError, match="dense_blocks"):
        patch(model, attention="radial", dense_blocks=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        patch(model, attention="vmoba", chunk_size=[1, (1, 2, 3, 4)])
    assert not hasattr(model, "_visattn_patch")
    patch(model, attention="sta", tile_size=(2, 5, 7))  # 2 does not divide the 3 frames: refused at the call
    try:
        with pytest.raises(ValueError, match="tile_size"):
            run(model, inputs)
    finally:
        unpatch(model)


# ---------------------------------------------------------------------------------------------- UNet / AgentSD
def agentsd_oracle(attn, hidden, grid, agent_grid, k_scale2, k_shortcut):
    """AgentSD's formula in float64 with explicit adaptive-average-pool bins (floor/ceil cell edges)."""
    batch, tokens, _ = hidden.shape
    heads = attn.heads
    q, k, v = (proj(hidden).view(batch, tokens, heads, -1).double() for proj in (attn.to_q, attn.to_k, attn.to_v))
    height, width = grid
    q_map = q.view(batch, height, width, heads, -1)
    agents = []
    for i in range(agent_grid[0]):
        r0, r1 = (i * height) // agent_grid[0], -(-((i + 1) * height) // agent_grid[0])
        for j in range(agent_grid[1]):
            c0, c1 = (j * width) // agent_grid[1], -(-((j + 1) * width) // agent_grid[1])
            agents.append(q_map[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    agents = torch.stack(agents, dim=1)  # [B, A, heads, D]
    scale = attn.scale
    first = torch.softmax(torch.einsum("bahd,bnhd->bhan", agents, k) * scale, dim=-1)
    agent_values = torch.einsum("bhan,bnhd->bahd", first, v)
    second = torch.softmax(torch.einsum("bnhd,bahd->bhna", q, agents) * scale**k_scale2, dim=-1)
    out = torch.einsum("bhna,bahd->bnhd", second, agent_values) + k_shortcut * v
    return attn.to_out[0](out.reshape(batch, tokens, -1))


def test_unet_agentsd_equals_formula_and_unpatch_restores():
    from diffusers import UNet2DConditionModel

    model = randomize(UNet2DConditionModel(
        sample_size=10, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, layers_per_block=1, attention_head_dim=8, norm_num_groups=8), 6)
    gen = torch.Generator().manual_seed(7)
    inputs = dict(sample=torch.randn(1, 4, 10, 14, generator=gen, dtype=torch.float64), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=gen, dtype=torch.float64))
    stock = run(model, inputs)
    before = dict(model.attn_processors)
    captured = []

    def capture(module, args, kwargs, output):
        captured.append((module, args[0] if args else kwargs["hidden_states"], output))

    self_attn = [m.attn1 for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert self_attn
    handles = [attn.register_forward_hook(capture, with_kwargs=True) for attn in self_attn]
    patch(model, agent_grid=(2, 3), k_scale2=0.3, k_shortcut=0.075, max_downsample=1)
    try:
        patched = run(model, inputs)
    finally:
        unpatch(model)
        for handle in handles:
            handle.remove()
    assert not torch.allclose(patched, stock)  # agent attention is an approximation: the swap took effect
    from diffusers.models.attention_processor import AttnProcessor2_0

    # 3 self-attentions at the full 10x14 map (agent attention), 1 in the mid block at 5x7 (dense: max_downsample=1)
    assert sorted(hidden.shape[1] for _, hidden, _ in captured) == [35, 140, 140, 140]
    for attn, hidden, output in captured:
        with torch.no_grad():
            if hidden.shape[1] == 140:
                want = agentsd_oracle(attn, hidden, (10, 14), (2, 3), 0.3, 0.075)
            else:
                want = AttnProcessor2_0()(attn, hidden)
        torch.testing.assert_close(output, want, atol=1e-11, rtol=1e-9)
    assert all(model.attn_processors[name] is proc for name, proc in before.items())
    assert torch.equal(run(model, inputs), stock)
    with pytest.raises(ValueError, match="agent_grid"):
        AgentSDAttnProcessor(agent_grid=0)


@pytest.mark.gpu
@pytest.mark.parametrize("grid, na", [((64, 64), dict(kernel_size=(21, 21))),
                                      ((64, 64), dict(kernel_size=(32, 32), stride=(16, 16))),
                                      ((6, 16, 20), dict(kernel_size=(3, 7, 7)))], ids=["na2d", "gna2d", "na3d"])
def test_joint_attention_triton_matches_reference_on_cuda(grid, na):
    """FLUX-style joint attention (512 text tokens first) in bf16: the Triton path against the exact reference."""
    from visattn.diffusion import joint_neighborhood_attention
    from visattn.diffusion.processors import _kernel_args

    torch.manual_seed(0)
    shape = (1, 512 + math.prod(grid), 8, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = _kernel_args(grid, na["kernel_size"], 1, na.get("stride", 1), False)
    fused = joint_neighborhood_attention(q, k, v, grid, 512, True, args, backend="triton").float()
    reference = joint_neighborhood_attention(q, k, v, grid, 512, True, args, backend="reference").float()
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=2e-2)
