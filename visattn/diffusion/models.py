"""A small family of class-conditional diffusion transformers, created by name, with flow-matching training and an
Euler sampler.

``create_dit(name, attention=..., **overrides)``: ``dit_s_2``, ``dit_b_2``, ``dit_l_2``, ``dit_xl_2`` are the DiT
paper's patch-2 configurations (hidden 384/768/1024/1152, depth 12/12/24/28, heads 6/12/16/16; 256² images as
32×32×4 latents); ``hdit_s`` / ``hdit_b`` are HDiT-like hierarchies (two levels of neighborhood-capable blocks around
a global level). Every argument of the model can be overridden by keyword, e.g. a tiny CPU model::

    model = create_dit("dit_s_2", input_size=16, in_channels=1, hidden_size=64, depth=2, num_heads=2,
                       num_classes=10, learn_sigma=False, attention="neighborhood", kernel_size=3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visattn.diffusion.blocks import DiTBlock, HDiTBlock, TokenMerge, TokenSplit


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (possibly fractional) timesteps ``t [B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """``t [B]`` -> ``[B, hidden]``: sinusoidal features (256) through a 2-layer SiLU MLP (DiT)."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> ``[B, hidden]``; index ``num_classes`` is the "no class" token for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``[H, W, dim]`` (half the channels per axis), as in DiT/MAE."""
    if dim % 4:
        raise ValueError(f"hidden_size={dim} must be divisible by 4 for the 2-D sin-cos embedding")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(height, dtype=torch.float64)[:, None] * omega
    cols = torch.arange(width, dtype=torch.float64)[:, None] * omega
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_emb, col_emb], dim=-1).float()


class DiT(nn.Module):
    """Class-conditional DiT on ``[B, C, H, W]`` latents with a selectable self-attention.

    Args:
        input_size: latent side (``H = W``).
        patch_size: latent patch side; the token grid is ``input_size / patch_size`` squared.
        in_channels: latent channels.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        num_classes: classes (plus one "no class" token); ``class_dropout`` for classifier-free guidance.
        learn_sigma: predict a variance too (output ``2 * in_channels``), as DiT does.
        attention: "dense", "neighborhood", "window" or "agent" for every block.
        backend: visattn backend (None: default).
        **attention_kwargs: the attention's arguments (``kernel_size``, ``stride``, ``window_size``, ...).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout: float = 0.1, learn_sigma: bool = True, attention: str = "dense",
                 backend: str | None = None, **attention_kwargs):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide input_size={input_size}")
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid, self.grid), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, attention, mlp_ratio=mlp_ratio, backend=backend,
                                              **attention_kwargs) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        for layer in (self.final_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """``x [B, C, H, W]``, ``t [B]`` in [0, 1] (or DDPM steps), ``y [B]`` class ids -> ``[B, C_out, H, W]``."""
        tokens = self.x_embedder(x).permute(0, 2, 3, 1) + self.pos_embed.to(x.dtype)  # [B, h, w, hidden]
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        tokens = self.final_norm(tokens) * (1 + scale[:, None, None]) + shift[:, None, None]
        out = self.final_linear(tokens)  # [B, h, w, p*p*C_out]
        p, batch, side = self.patch_size, x.shape[0], self.grid
        out = out.reshape(batch, side, side, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, self.out_channels, side * p, side * p)


class HDiT(nn.Module):
    """An HDiT-like hourglass: blocks at each level, token merge down, a middle level, token split up with skips.

    Args:
        input_size: image side; ``patch_size``: pixels per token at the top level.
        in_channels: image channels.
        widths, depths, num_heads: per level, top (high resolution) first; the last entry is the middle level.
        attention: attention of every level but the middle one (HDiT uses neighborhood attention there).
        middle_attention: attention of the middle level (HDiT: "dense", global).
        num_classes, class_dropout: class conditioning.
        mlp_ratio: GEGLU width ratio.
        backend: visattn backend (None: default).
        **attention_kwargs: the outer levels' attention arguments (e.g. ``kernel_size=7``).
    """

    def __init__(self, input_size: int = 64, patch_size: int = 2, in_channels: int = 3,
                 widths: Sequence[int] = (128, 256), depths: Sequence[int] = (2, 4), num_heads: Sequence[int] = (2, 4),
                 attention: str = "neighborhood", middle_attention: str = "dense", num_classes: int = 10,
                 class_dropout: float = 0.1, mlp_ratio: float = 3.0, backend: str | None = None, **attention_kwargs):
        super().__init__()
        if not len(widths) == len(depths) == len(num_heads) >= 2:
            raise ValueError("widths, depths and num_heads need one entry per level (at least 2)")
        self.patch_size, self.in_channels = patch_size, in_channels
        cond = widths[0]
        self.patch_in = nn.Linear(in_channels * patch_size**2, widths[0])
        self.t_embedder = TimestepEmbedder(cond)
        self.y_embedder = LabelEmbedder(num_classes, cond, class_dropout)
        outer = len(widths) - 1
        def make(level, kind, kwargs):
            return nn.ModuleList([HDiTBlock(widths[level], num_heads[level], kind, mlp_ratio=mlp_ratio,
                                            cond_dim=cond, backend=backend, **kwargs) for _ in range(depths[level])])
        self.down = nn.ModuleList([make(i, attention, attention_kwargs) for i in range(outer)])
        self.up = nn.ModuleList([make(i, attention, attention_kwargs) for i in range(outer)])
        self.middle = make(outer, middle_attention, {})
        self.merges = nn.ModuleList([TokenMerge(widths[i], widths[i + 1]) for i in range(outer)])
        self.splits = nn.ModuleList([TokenSplit(widths[i + 1], widths[i]) for i in range(outer)])
        self.out_norm = nn.RMSNorm(widths[0], eps=1e-6)
        self.patch_out = nn.Linear(widths[0], in_channels * patch_size**2)
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """``x [B, C, H, W]``, ``t [B]``, ``y [B]`` -> ``[B, C, H, W]``."""
        batch, channels, height, width = x.shape
        p = self.patch_size
        tokens = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3)
        tokens = self.patch_in(tokens)
        c = self.t_embedder(t) + self.y_embedder(y)
        skips = []
        for blocks, merge in zip(self.down, self.merges, strict=False):
            for block in blocks:
                tokens = block(tokens, c)
            skips.append(tokens)
            tokens = merge(tokens)
        for block in self.middle:
            tokens = block(tokens, c)
        for blocks, split, skip in reversed(list(zip(self.up, self.splits, skips, strict=False))):
            tokens = split(tokens, skip)
            for block in blocks:
                tokens = block(tokens, c)
        out = self.patch_out(self.out_norm(tokens))  # [B, h, w, C*p*p]
        out = out.reshape(batch, height // p, width // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)


# name -> (class, config). DiT: Peebles & Xie 2023, Table 1 (patch 2).
_CONFIGS: dict[str, tuple[type, dict]] = {
    "dit_s_2": (DiT, dict(hidden_size=384, depth=12, num_heads=6, patch_size=2)),
    "dit_b_2": (DiT, dict(hidden_size=768, depth=12, num_heads=12, patch_size=2)),
    "dit_l_2": (DiT, dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2)),
    "dit_xl_2": (DiT, dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)),
    "hdit_s": (HDiT, dict(widths=(128, 256), depths=(2, 4), num_heads=(2, 4))),
    "hdit_b": (HDiT, dict(widths=(256, 512, 768), depths=(2, 2, 8), num_heads=(4, 8, 12))),
}


def list_dits() -> tuple[str, ...]:
    """The names :func:`create_dit` knows."""
    return tuple(_CONFIGS)


def create_dit(name: str, attention: str = "dense", **overrides) -> nn.Module:
    """Build a model of the family by name; keyword arguments override the named configuration.

    Args:
        name: one of :func:`list_dits`.
        attention: "dense", "neighborhood", "window" or "agent" (HDiT: the outer levels').
        **overrides: any constructor argument of :class:`DiT` / :class:`HDiT`, plus the attention's own arguments.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {list_dits()}")
    cls, config = _CONFIGS[name]
    return cls(**{**config, **overrides}, attention=attention)


# ------------------------------------------------------------------------------------------- training / sampling
def flow_matching_loss(model: nn.Module, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Rectified-flow loss: ``x_t = (1 - t) x0 + t ε``, the model predicts the velocity ``ε - x0``.

    Args:
        model: ``model(x_t, t, y)`` returning ``[B, C(, ...)]`` whose first ``C`` channels are the velocity.
        x0: clean samples ``[B, C, H, W]``.
        y: class ids ``[B]``.
        generator: optional RNG for ``t`` and ``ε``.
    """
    t = torch.rand(x0.shape[0], device=x0.device, generator=generator, dtype=x0.dtype)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_t = (1 - t.view(view)) * x0 + t.view(view) * noise
    velocity = model(x_t, t, y)[:, : x0.shape[1]]
    return F.mse_loss(velocity, noise - x0)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x0: Tensor, y: Tensor,
                  generator: torch.Generator | None = None) -> float:
    """One optimiser step of :func:`flow_matching_loss`; returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = flow_matching_loss(model, x0, y, generator)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def sample_euler(model: nn.Module, shape: Sequence[int], y: Tensor, steps: int = 20, guidance: float = 1.0,
                 null_class: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Integrate the learned velocity from noise (t=1) to data (t=0) with ``steps`` Euler steps.

    Args:
        model: trained with :func:`flow_matching_loss`.
        shape: output shape ``[B, C, H, W]``.
        y: class ids ``[B]``.
        steps: Euler steps.
        guidance: classifier-free guidance scale (1: none). Guidance runs the model a second time on the
            "no class" label ``null_class``.
        null_class: the "no class" label id for guidance. None: ``model.y_embedder.num_classes`` (the extra
            label :class:`DiT` and :class:`HDiT` train with ``class_dropout``); a model without a ``y_embedder``
            must pass it when ``guidance != 1``.
        generator: RNG for the starting noise.
    """
    if guidance != 1.0 and null_class is None:
        null_class = getattr(getattr(model, "y_embedder", None), "num_classes", None)
        if null_class is None:
            raise ValueError(f"sample_euler: guidance={guidance} needs null_class= (the 'no class' label id; "
                             f"{type(model).__name__} has no y_embedder.num_classes to default to)")
    if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, int)):
        raise TypeError(f"sample_euler: null_class must be an int label id, got {null_class!r}")
    model.eval()
    device = y.device
    x = torch.randn(tuple(shape), device=device, generator=generator)
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    for t_now, t_next in zip(times[:-1], times[1:], strict=False):
        t = t_now.expand(x.shape[0])
        velocity = model(x, t, y)[:, : x.shape[1]]
        if guidance != 1.0:
            unconditional = model(x, t, torch.full_like(y, null_class))[:, : x.shape[1]]
            velocity = unconditional + guidance * (velocity - unconditional)
        x = x + (t_next - t_now) * velocity
    return x


def digits_dataset(size: int = 16) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans) as ``[N, 1, size, size]`` in [-1, 1], labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


__all__ = ["DiT", "HDiT", "LabelEmbedder", "TimestepEmbedder", "create_dit", "digits_dataset", "flow_matching_loss",
           "list_dits", "sample_euler", "sincos_pos_embed_2d", "timestep_embedding", "training_step"]
