"""LTX-2.5's diffusion video decoder: visattn's processor against diffusers' own FlexAttention processor.

The oracle is diffusers' ``LTX2VideoVaeNeighborhoodAttnProcessor`` (a FlexAttention block mask built by diffusers from
NATTEN's clamped-window rule), which runs on the CPU in this torch (eager flex_attention). Decoders are tiny,
randomly initialised, float64, with odd grids and kernels smaller than the grid in every stage.
"""

from __future__ import annotations

import pytest
import torch

ltx = pytest.importorskip("diffusers.models.autoencoders.ltx2_diffusion_decoder")

from visattn.diffusion import LTX2NeighborhoodAttnProcessor, patch, unpatch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny_decoder(seed: int = 0) -> torch.nn.Module:
    """Every stage runs NA with a kernel smaller than its (odd) grid; stage 5 sees a 5x5x7 token grid."""
    torch.manual_seed(seed)
    model = ltx.LTX2VideoDiffusionDecoderModel(
        latent_channels=8, patch_size=2, decoder_head_dim=8, decoder_stage_channels=(64, 32, 16, 16, 8),
        decoder_stage_depths=(1, 1, 1, 1, 2), decoder_stage_kernels=((3, 3, 3), (3, 3, 5), (3, 5, 3), (3, 3, 3)),
        decoder_upsample_strides=((1, 1, 1), (2, 1, 1), (1, 1, 1), (1, 1, 1)), decoder_stage5_kernel=(3, 3, 5),
        decoder_t_emb_dim=32, spatial_compression_ratio=2, temporal_compression_ratio=2,
    ).double().eval()
    with torch.no_grad():
        for param in model.parameters():  # zero-initialised tables would hide modulation bugs
            param.normal_(0.0, 0.2)
    return model


def decode(model, latent):
    with torch.no_grad():
        return model.decode(latent, generator=torch.Generator().manual_seed(0)).sample


@pytest.fixture(scope="module")
def decoder_and_stock():
    model = tiny_decoder()
    latent = torch.randn(1, 8, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert isinstance(next(iter(model.attn_processors.values())), ltx.LTX2VideoVaeNeighborhoodAttnProcessor)
    return model, latent, decode(model, latent)


def test_decoder_equals_flex_processor(decoder_and_stock):
    model, latent, stock = decoder_and_stock
    model.set_attn_processor(LTX2NeighborhoodAttnProcessor())
    try:
        ours = decode(model, latent)
    finally:
        model.set_attn_processor(ltx.LTX2VideoVaeNeighborhoodAttnProcessor())
    assert ours.shape == stock.shape == (1, 3, 5, 10, 14)
    torch.testing.assert_close(ours, stock, atol=1e-12, rtol=1e-10)


def test_patch_unpatch_restores_exactly(decoder_and_stock):
    model, latent, stock = decoder_and_stock
    before = dict(model.attn_processors)
    patch(model)
    assert all(isinstance(p, LTX2NeighborhoodAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(decode(model, latent), stock, atol=1e-12, rtol=1e-10)
    unpatch(model)
    assert all(model.attn_processors[name] is proc for name, proc in before.items())
    assert torch.equal(decode(model, latent), stock)


def test_never_builds_a_block_mask(decoder_and_stock, monkeypatch):
    model, latent, stock = decoder_and_stock

    def forbidden(*args, **kwargs):
        raise AssertionError("a block mask was built")

    monkeypatch.setattr(ltx, "_neighborhood_block_mask", forbidden)
    model.set_attn_processor(LTX2NeighborhoodAttnProcessor())
    try:
        torch.testing.assert_close(decode(model, latent), stock, atol=1e-12, rtol=1e-10)
    finally:
        model.set_attn_processor(ltx.LTX2VideoVaeNeighborhoodAttnProcessor())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_module_non_contiguous_odd_grid(dtype):
    """A single attention module, the processor set on it alone, fed a permuted (non-contiguous) 7x9x11 input."""
    torch.manual_seed(3)
    attn = ltx.LTX2VideoVaeNeighborhoodAttention(dim=32, kernel_size=(3, 5, 7), head_dim=16).to(dtype)
    channels_first = torch.randn(2, 32, 7, 9, 11, dtype=dtype)
    hidden = channels_first.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C] view, not contiguous
    assert not hidden.is_contiguous()
    with torch.no_grad():
        stock = attn(hidden)
        attn.set_processor(LTX2NeighborhoodAttnProcessor(backend="reference"))
        ours = attn(hidden)
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(ours, stock, **tol)


def test_refuses_other_modules_and_untested_versions(monkeypatch):
    import diffusers

    processor = LTX2NeighborhoodAttnProcessor()
    with pytest.raises(TypeError, match="LTX2VideoVaeNeighborhoodAttention"):
        processor(torch.nn.Linear(4, 4), torch.randn(1, 3, 3, 3, 4))
    monkeypatch.setattr(diffusers, "__version__", "0.39.0")
    with pytest.raises(ValueError, match="0.39.0"):
        LTX2NeighborhoodAttnProcessor()
    monkeypatch.setenv("VISATTN_ALLOW_UNTESTED_DIFFUSERS", "1")
    with pytest.warns(UserWarning, match="0.39.0"):
        LTX2NeighborhoodAttnProcessor()


def test_refuses_a_changed_interface(monkeypatch):
    def project_qkv(self, hidden_states, extra):  # a future diffusers with another signature
        raise AssertionError

    monkeypatch.setattr(ltx.LTX2VideoVaeNeighborhoodAttention, "project_qkv", project_qkv)
    with pytest.raises(ValueError, match="project_qkv"):
        LTX2NeighborhoodAttnProcessor()


@pytest.mark.gpu
def test_production_stage_on_cuda_matches_reference():
    """One 3x7x7 stage module at LTX-2.5's 18x32x48 grid with 16 heads of 64, bf16: Triton engine vs reference."""
    torch.manual_seed(0)
    attn = ltx.LTX2VideoVaeNeighborhoodAttention(dim=1024, kernel_size=(3, 7, 7)).cuda().to(torch.bfloat16)
    hidden = torch.randn(1, 18, 32, 48, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        attn.set_processor(LTX2NeighborhoodAttnProcessor(backend="reference"))
        reference = attn(hidden).float()
        attn.set_processor(LTX2NeighborhoodAttnProcessor(backend="triton"))
        fused = attn(hidden).float()
    torch.testing.assert_close(fused, reference, atol=3e-2, rtol=3e-2)
