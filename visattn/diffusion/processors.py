"""Training-free attention swaps for diffusers' diffusion transformers and UNets.

Each processor reproduces what the stock diffusers processor does around attention (projections, q/k norms, rotary
embeddings, output projections, in the same order) and replaces only the attention call:

* :class:`FluxNeighborhoodAttnProcessor` (``FluxAttention``; text tokens first),
  :class:`HunyuanVideoNeighborhoodAttnProcessor` (``Attention`` with HunyuanVideo's processor; text tokens last,
  padded text masked) — joint attention: image queries get neighborhood attention (NA / GNA: ``kernel_size``,
  ``dilation``, ``stride``, ``is_causal``) over the image grid *plus every valid text token as an extra global key*,
  in one joint softmax (``additional_keys``); text queries keep dense attention over all tokens.
* :class:`WanNeighborhoodAttnProcessor` (``WanAttention`` self-attention): 3-D NA over the video grid.
* :class:`AgentSDAttnProcessor` (``Attention`` self-attention in a UNet's ``BasicTransformerBlock``): AgentSD's
  agent attention, ``softmax(s2 q Aᵀ) softmax(s A kᵀ) v + k_shortcut · v``.

The processors need the latent grid: :func:`visattn.diffusion.patch` installs a forward pre-hook on the model that
reads it from the call (FLUX: ``img_ids``; HunyuanVideo / Wan: the latent's shape and the patch size; UNet: each
``Transformer2DModel``'s input) into a shared :class:`LatentGrid`. A processor built by hand can take a fixed
``grid`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from visattn import functional
from visattn.diffusion import _compat


@dataclass
class LatentGrid:
    """The token grid of the current forward call, written by a pre-forward hook and read by the processors.

    Attributes:
        grid: ``(H, W)`` or ``(T, H, W)`` image tokens, row-major in the sequence; None until a call sets it.
        text_tokens: text tokens concatenated with the image tokens (FLUX single-stream blocks need it: they get
            one concatenated sequence); None when not known.
        downsample: (UNet) how much smaller this grid is than the model's input latent; None when not known.
    """

    grid: tuple[int, ...] | None = None
    text_tokens: int | None = None
    downsample: int | None = None


def _kernel_args(grid: Sequence[int], kernel_size, dilation, stride, is_causal) -> dict:
    """Per-dimension tuples for ``na{n}d``; a kernel longer than the grid (dilation 1) is clamped to it, so a kernel
    covering the whole grid is dense attention over the image."""
    rank = len(grid)
    def as_tuple(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    kernel, dil, strd, causal = (as_tuple(v) for v in (kernel_size, dilation, stride, is_causal))
    for name, value in (("kernel_size", kernel), ("dilation", dil), ("stride", strd), ("is_causal", causal)):
        if len(value) != rank:
            raise ValueError(f"{name} must be one value or {rank} values for a {rank}-D grid {tuple(grid)}, "
                             f"got {value!r}")
    kernel = tuple(min(k, n) if d == 1 and isinstance(k, int) else k
                   for k, n, d in zip(kernel, grid, dil, strict=True))
    strd = tuple(min(s, k) if isinstance(s, int) and isinstance(k, int) else s
                 for s, k in zip(strd, kernel, strict=True))
    return {"kernel_size": kernel, "dilation": dil, "stride": strd, "is_causal": causal}


def _na(rank: int):
    return (functional.na1d, functional.na2d, functional.na3d)[rank - 1]


def _text_lengths(mask: Tensor | None, image_tokens: int, text_tokens: int, text_first: bool) -> list[int] | None:
    """Valid text tokens per sample from a boolean key mask ``[B, 1, 1, L]`` whose text part is a prefix of valid
    tokens (HunyuanVideo's padding); None when every text token is valid. Anything else is refused."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(f"attention_mask must be a boolean key mask [B, 1, 1, L], got {tuple(mask.shape)} "
                         f"{mask.dtype}")
    keys = mask[:, 0, 0]
    image, text = (keys[:, text_tokens:], keys[:, :text_tokens]) if text_first else (
        keys[:, :image_tokens], keys[:, image_tokens:])
    if not bool(image.all()):
        raise ValueError("attention_mask masks image tokens; the neighborhood processors only support masks over "
                         "text tokens (padding)")
    lengths = text.sum(dim=1)
    prefix = torch.arange(text_tokens, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, text):
        raise ValueError("attention_mask's text part must be a prefix of valid tokens followed by padding")
    lengths = lengths.tolist()
    return None if all(n == text_tokens for n in lengths) else lengths


Attend = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]


def joint_attention(query: Tensor, key: Tensor, value: Tensor, grid: Sequence[int], text_tokens: int,
                    text_first: bool, attend: Attend, attention_mask: Tensor | None = None) -> Tensor:
    """Joint text + image attention with a sparse pattern for the image queries.

    Args:
        query, key, value: ``[B, L, heads, head_dim]``, ``L = text_tokens + prod(grid)``, the text tokens at the
            front (``text_first``) or the end; image tokens row-major over ``grid``. Any strides.
        grid: the image token grid, 1-3 dims.
        text_tokens: number of text tokens (0: plain self-attention over the image).
        text_first: where the text tokens sit in the sequence.
        attend: ``attend(q, k, v, extra_k, extra_v)`` on ``[B, *grid, heads, D]`` maps with the valid text tokens
            ``[B, n, heads, D]`` (or None) as extra keys in the same softmax: the image rows' attention.
        attention_mask: optional boolean key mask ``[B, 1, 1, L]`` masking trailing text padding.

    Returns:
        ``[B, L, heads, head_dim_v]``: image rows = ``attend`` over the image plus the valid text tokens (one
        softmax); text rows = dense attention over all valid keys (as the stock processor computes them).
    """
    batch, length, heads, _ = query.shape
    image_tokens = math.prod(grid)
    if image_tokens + text_tokens != length:
        raise ValueError(f"the sequence has {length} tokens but the grid {tuple(grid)} and {text_tokens} text "
                         f"tokens make {image_tokens + text_tokens}")
    image = slice(text_tokens, length) if text_first else slice(0, image_tokens)
    text = slice(0, text_tokens) if text_first else slice(image_tokens, length)
    def as_grid(t):
        return t[:, image].unflatten(1, tuple(grid))
    lengths = _text_lengths(attention_mask, image_tokens, text_tokens, text_first) if text_tokens else None

    def image_rows(sample: slice, valid_text: int) -> Tensor:
        q, k, v = (as_grid(t[sample]) for t in (query, key, value))
        if valid_text:
            return attend(q, k, v, key[sample, text][:, :valid_text], value[sample, text][:, :valid_text])
        return attend(q, k, v, None, None)

    if lengths is None:
        image_out = image_rows(slice(None), text_tokens).flatten(1, len(grid))
    else:  # different text lengths per sample: one call per sample, each with its own valid text keys
        image_out = torch.cat([image_rows(slice(b, b + 1), n).flatten(1, len(grid))
                               for b, n in enumerate(lengths)])
    if not text_tokens:
        return image_out
    text_out = F.scaled_dot_product_attention(query[:, text].transpose(1, 2), key.transpose(1, 2),
                                              value.transpose(1, 2), attn_mask=attention_mask).transpose(1, 2)
    text_out = text_out.to(image_out.dtype)
    return torch.cat([text_out, image_out] if text_first else [image_out, text_out], dim=1)


def joint_neighborhood_attention(query: Tensor, key: Tensor, value: Tensor, grid: Sequence[int], text_tokens: int,
                                 text_first: bool, na_args: dict, attention_mask: Tensor | None = None,
                                 backend: str | None = None) -> Tensor:
    """:func:`joint_attention` with neighborhood attention (``na_args``: ``kernel_size``/``dilation``/``stride``/
    ``is_causal`` per grid dimension) for the image queries; ``backend`` for the NA call (None: the default)."""
    op = _na(len(grid))
    extra = {} if backend is None else {"backend": backend}

    def attend(q, k, v, extra_k, extra_v):
        return op(q, k, v, additional_keys=extra_k, additional_values=extra_v, **na_args, **extra)

    return joint_attention(query, key, value, grid, text_tokens, text_first, attend, attention_mask)


# The video patterns a processor can run on its image tokens besides NA, and their options with defaults (None:
# the processor's own default).
VIDEO_PATTERNS: dict[str, dict[str, object]] = {
    "sta": {"tile_size": (6, 8, 8), "kernel_tiles": (3, 3, 3)},
    "radial": {"block_size": 128, "decay_factor": 1.0, "attention_sink": None},
    "vmoba": {"chunk_size": 1, "select_mode": "threshold", "topk": 3, "threshold": 0.25,
              "threshold_type": "query_head"},
}


class _GridProcessor:
    """Shared state of the grid processors: the image tokens' attention pattern (NA arguments, or a video pattern
    of ``VIDEO_PATTERNS`` and its options) and where the grid comes from."""

    _what = "neighborhood processor"
    _attention = ("", "")  # (diffusers module, class) the processor was written for
    _patterns: tuple[str, ...] = ("neighborhood",)  # the image-token patterns this family takes
    _sink = False  # Radial Attention's attention_sink default for this family (the release: Wan True)

    def __init__(self, kernel_size=None, dilation=1, stride=1, is_causal=False, grid: Sequence[int] | None = None,
                 context: LatentGrid | None = None, backend: str | None = None, *,
                 attention: str = "neighborhood", **options):
        _compat.check_diffusers_version(self._what)
        self._attention_cls = _compat.load_class(*self._attention, self._what)
        if attention not in self._patterns:
            raise ValueError(f"{self._what}: attention must be one of {self._patterns}, got {attention!r}")
        self.attention = attention
        allowed = VIDEO_PATTERNS.get(attention, {})
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{self._what}: attention={attention!r} takes no argument(s) {unknown}"
                            + (f"; its options are {sorted(allowed)}" if allowed else ""))
        if attention == "neighborhood":
            if kernel_size is None:
                raise ValueError(f"{self._what}: attention='neighborhood' needs kernel_size")
        elif kernel_size is not None:
            raise ValueError(f"{self._what}: kernel_size belongs to attention='neighborhood', not {attention!r}")
        self.options = {**allowed, **options}
        if attention == "radial" and self.options["attention_sink"] is None:
            self.options["attention_sink"] = self._sink
        self._check_options()
        self.kernel_size, self.dilation, self.stride, self.is_causal = kernel_size, dilation, stride, is_causal
        self.fixed_grid = tuple(grid) if grid is not None else None
        self.context = context if context is not None else LatentGrid()
        self.backend = backend
        self._check_interface()

    def _check_options(self) -> None:
        """The video pattern's options, checked at construction by the functional API's checkers."""
        opts = self.options
        if self.attention == "sta":
            opts["tile_size"] = functional.int_tuple(opts["tile_size"], 3, "tile_size")
            opts["kernel_tiles"] = functional.int_tuple(opts["kernel_tiles"], 3, "kernel_tiles")
        elif self.attention == "vmoba":
            opts.update(functional.vmoba_options(**opts))
        elif self.attention == "radial":
            opts["block_size"] = functional.positive_int(opts["block_size"], "block_size")
            opts["decay_factor"] = functional.check_decay(opts["decay_factor"])
            functional.check_flag(opts["attention_sink"], "attention_sink")

    def _check_interface(self) -> None:
        """Structure checks against the installed diffusers (overridden per family)."""

    def _check_module(self, attn) -> None:
        if not isinstance(attn, self._attention_cls):
            raise TypeError(f"{self._what} works on {self._attention[1]} modules (diffusers "
                            f"{_compat.diffusers_version()}), got {type(attn).__name__}")

    def grid(self) -> tuple[int, ...]:
        grid = self.fixed_grid or self.context.grid
        if grid is None:
            raise ValueError(f"{self._what} does not know the latent grid: patch the model with "
                             "visattn.diffusion.patch (its pre-forward hook reads the grid) or pass grid=")
        return grid

    def na_args(self, grid: Sequence[int]) -> dict:
        return _kernel_args(grid, self.kernel_size, self.dilation, self.stride, self.is_causal)

    def joint(self, query: Tensor, key: Tensor, value: Tensor, text_tokens: int, text_first: bool,
              attention_mask: Tensor | None = None) -> Tensor:
        """:func:`joint_attention` over the current grid with this processor's pattern."""
        grid = self.grid()
        extra = {} if self.backend is None else {"backend": self.backend}
        if self.attention == "neighborhood":
            return joint_neighborhood_attention(query, key, value, grid, text_tokens, text_first,
                                                self.na_args(grid), attention_mask, self.backend)
        if len(grid) != 3:
            raise ValueError(f"{self._what}: attention={self.attention!r} needs a (T, H, W) grid, got {grid}")
        opts = self.options
        if self.attention == "sta":
            def attend(q, k, v, extra_k, extra_v):
                return functional.sliding_tile_attention(q, k, v, opts["tile_size"], opts["kernel_tiles"],
                                                         additional_keys=extra_k, additional_values=extra_v,
                                                         **extra)
        elif self.attention == "vmoba":
            def attend(q, k, v, extra_k, extra_v):
                return functional.vmoba_attention(q, k, v, **opts, additional_keys=extra_k, additional_values=extra_v,
                                                  **extra)
        else:
            def attend(q, k, v, extra_k, extra_v):
                return functional.radial_attention(q, k, v, opts["block_size"], opts["decay_factor"],
                                                   opts["attention_sink"], additional_keys=extra_k,
                                                   additional_values=extra_v, **extra)
        return joint_attention(query, key, value, grid, text_tokens, text_first, attend, attention_mask)


class FluxNeighborhoodAttnProcessor(_GridProcessor):
    """NA / GNA for the image tokens of FLUX's joint attention; text tokens stay dense and are global keys.

    For ``FluxAttention`` (``FluxTransformer2DModel``'s double- and single-stream blocks). Sequence layout
    ``[text, image]``; the image tokens are row-major over ``grid = (H/2, W/2)`` latent patches.

    Args:
        kernel_size, dilation, stride, is_causal: NA arguments per grid dimension (int or 2-tuple); a kernel longer
            than the grid is clamped to it.
        grid: fixed ``(H, W)`` token grid; default: read by the model's pre-forward hook from ``img_ids``. With a
            fixed grid the processor needs no hook: a single-stream block's text length is its sequence length
            minus ``H * W``, so ``model.set_attn_processor(FluxNeighborhoodAttnProcessor(5, grid=(64, 64)))`` works.
        context: the :class:`LatentGrid` the hook writes (shared by all processors of one model).
        backend: visattn backend (None: default).
    """

    _what = "visattn.diffusion.FluxNeighborhoodAttnProcessor"
    _attention = ("models.transformers.transformer_flux", "FluxAttention")

    def _check_interface(self) -> None:
        stock = _compat.load_class("models.transformers.transformer_flux", "FluxAttnProcessor", self._what)
        _compat.require_parameters(stock.__call__, ("attn", "hidden_states", "encoder_hidden_states",
                                                    "attention_mask", "image_rotary_emb"),
                                   "FluxAttnProcessor.__call__", self._what)
        self._projections = _compat.load_class("models.transformers.transformer_flux", "_get_qkv_projections",
                                               self._what)
        self._rotary = _compat.load_class("models.embeddings", "apply_rotary_emb", self._what)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None) -> Tensor | tuple[Tensor, Tensor]:
        self._check_module(attn)
        if attention_mask is not None:
            raise ValueError(f"{self._what} does not support attention_mask (FLUX passes none)")
        query, key, value, enc_query, enc_key, enc_value = self._projections(attn, hidden_states,
                                                                             encoder_hidden_states)
        def split(t):
            return t.unflatten(-1, (-1, attn.head_dim))
        query, key, value = attn.norm_q(split(query)), attn.norm_k(split(key)), split(value)
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(split(enc_query)), query], dim=1)
            key = torch.cat([attn.norm_added_k(split(enc_key)), key], dim=1)
            value = torch.cat([split(enc_value), value], dim=1)
        if image_rotary_emb is not None:
            query = self._rotary(query, image_rotary_emb, sequence_dim=1)
            key = self._rotary(key, image_rotary_emb, sequence_dim=1)
        grid = self.grid()
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
        elif self.context.text_tokens is not None:  # single-stream block: text is already in hidden_states
            text_tokens = self.context.text_tokens
        else:  # single-stream block, hand-built processor: the image part is the grid, the text the rest
            text_tokens = query.shape[1] - math.prod(grid)
            if text_tokens < 0:
                raise ValueError(f"{self._what}: the single-stream sequence has {query.shape[1]} tokens, fewer than "
                                 f"the grid {tuple(grid)} holds; pass the image token grid as grid=")
        out = self.joint(query, key, value, text_tokens, True)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        enc_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc_out.contiguous())


class HunyuanVideoNeighborhoodAttnProcessor(_GridProcessor):
    """NA / GNA for the video tokens of HunyuanVideo's joint attention; text tokens stay dense and are global keys.

    For the ``Attention`` modules of ``HunyuanVideoTransformer3DModel``'s double- and single-stream blocks (layout
    ``[video, text]``; padded text tokens, masked by the model's ``attention_mask``, are left out of every softmax).

    Args:
        kernel_size, dilation, stride, is_causal: NA arguments per ``(T, H, W)`` dimension.
        grid: fixed ``(T, H, W)`` token grid; default: read by the model's pre-forward hook.
        context: the :class:`LatentGrid` the hook writes.
        backend: visattn backend (None: default).
    """

    _what = "visattn.diffusion.HunyuanVideoNeighborhoodAttnProcessor"
    _attention = ("models.attention_processor", "Attention")
    _patterns = ("neighborhood", "sta", "radial", "vmoba")

    def _check_interface(self) -> None:
        stock = _compat.load_class("models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0",
                                   self._what)
        _compat.require_parameters(stock.__call__, ("attn", "hidden_states", "encoder_hidden_states",
                                                    "attention_mask", "image_rotary_emb"),
                                   "HunyuanVideoAttnProcessor2_0.__call__", self._what)
        self._rotary = _compat.load_class("models.embeddings", "apply_rotary_emb", self._what)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None) -> tuple[Tensor, Tensor | None]:
        self._check_module(attn)
        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        joint_inside = attn.add_q_proj is None and encoder_hidden_states is not None  # single-stream block
        if joint_inside:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        def split(t):
            return t.unflatten(2, (attn.heads, -1))
        query, key, value = (split(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # rotary on the video tokens only
            video = query.shape[1] - (text_tokens if joint_inside else 0)
            def rotate(t):
                return torch.cat([self._rotary(t[:, :video], image_rotary_emb, sequence_dim=1), t[:, video:]],
                                 dim=1)
            query, key = rotate(query), rotate(key)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            enc_query, enc_key, enc_value = (split(proj(encoder_hidden_states))
                                             for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                enc_query = attn.norm_added_q(enc_query)
            if attn.norm_added_k is not None:
                enc_key = attn.norm_added_k(enc_key)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, enc_query), (key, enc_key),
                                                                       (value, enc_value)))
        out = self.joint(query, key, value, text_tokens, False, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        out, enc_out = out[:, :-text_tokens], out[:, -text_tokens:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out


class WanNeighborhoodAttnProcessor(_GridProcessor):
    """3-D NA / GNA for the self-attention (``attn1``) of ``WanTransformer3DModel``'s blocks.

    Args:
        kernel_size, dilation, stride, is_causal: NA arguments per ``(T, H, W)`` dimension.
        grid: fixed ``(T, H, W)`` token grid; default: read by the model's pre-forward hook.
        context: the :class:`LatentGrid` the hook writes.
        backend: visattn backend (None: default).
    """

    _what = "visattn.diffusion.WanNeighborhoodAttnProcessor"
    _attention = ("models.transformers.transformer_wan", "WanAttention")
    _patterns = ("neighborhood", "sta", "radial", "vmoba")
    _sink = True

    def _check_interface(self) -> None:
        stock = _compat.load_class("models.transformers.transformer_wan", "WanAttnProcessor", self._what)
        _compat.require_parameters(stock.__call__, ("attn", "hidden_states", "encoder_hidden_states",
                                                    "attention_mask", "rotary_emb"),
                                   "WanAttnProcessor.__call__", self._what)
        self._projections = _compat.load_class("models.transformers.transformer_wan", "_get_qkv_projections",
                                               self._what)

    @staticmethod
    def _rotate(hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Wan's interleaved-pair rotary embedding (cos/sin repeat each frequency twice)."""
        even, odd = hidden.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = cos[..., 0::2], sin[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(hidden)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb=None) -> Tensor:
        self._check_module(attn)
        if encoder_hidden_states is not None or attn.add_k_proj is not None or attention_mask is not None:
            raise ValueError(f"{self._what} is for Wan's self-attention (attn1): no encoder states, added kv "
                             "projections or mask")
        query, key, value = self._projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        def split(t):
            return t.unflatten(2, (attn.heads, -1))
        query, key, value = split(query), split(key), split(value)
        if rotary_emb is not None:
            query, key = self._rotate(query, *rotary_emb), self._rotate(key, *rotary_emb)
        out = self.joint(query, key, value, 0, False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class AgentSDAttnProcessor:
    """AgentSD-style agent attention for the self-attention of a UNet's ``BasicTransformerBlock`` (``attn1``).

    ``out = softmax(s2 · q Aᵀ) · softmax(s · A kᵀ) · v + k_shortcut · v`` per head, with ``s = attn.scale``,
    ``s2 = s ** k_scale2`` and agents ``A`` = the mean of ``q`` over a regular ``agent_grid`` of cells of the token
    map. AgentSD (Han et al. 2024) forms its agents by ToMe-merging similar tokens (``to_q`` of merged tokens); the
    mean over fixed cells is the deterministic, position-regular version of that merge (``to_q`` is affine, so the
    mean of ``q`` is ``to_q`` of the mean token). Grids coarser than ``max_downsample`` keep dense attention, like
    AgentSD's ``max_downsample``.

    Args:
        agent_grid: agents per side ``(h, w)`` (or an int): the ``H x W`` token map is average-pooled to it.
        k_scale2: exponent of the second softmax's scale (AgentSD default 0.3).
        k_shortcut: weight of the ``v`` shortcut (AgentSD default 0.075).
        max_downsample: apply agent attention only where the token map is at most this much smaller than the
            model's input latent (1: the highest-resolution blocks only, AgentSD's default).
        context: the :class:`LatentGrid` of this transformer block, written by the hook ``patch`` installs.
        grid: fixed ``(H, W)`` token map instead of a hook.
        backend: visattn backend for ``agent_attention`` (None: default).
    """

    _what = "visattn.diffusion.AgentSDAttnProcessor"

    def __init__(self, agent_grid=(8, 8), k_scale2: float = 0.3, k_shortcut: float = 0.075, max_downsample: int = 1,
                 context: LatentGrid | None = None, grid: Sequence[int] | None = None, backend: str | None = None):
        _compat.check_diffusers_version(self._what)
        self._attention_cls = _compat.load_class("models.attention_processor", "Attention", self._what)
        self.agent_grid = (agent_grid, agent_grid) if isinstance(agent_grid, int) else tuple(agent_grid)
        if len(self.agent_grid) != 2 or any(not isinstance(a, int) or a < 1 for a in self.agent_grid):
            raise ValueError(f"agent_grid must be a positive int or a pair of them, got {agent_grid!r}")
        self.k_scale2, self.k_shortcut, self.max_downsample = float(k_scale2), float(k_shortcut), max_downsample
        self.context = context if context is not None else LatentGrid()
        self.fixed_grid = tuple(grid) if grid is not None else None
        self.backend = backend

    def _dense(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if not isinstance(attn, self._attention_cls):
            raise TypeError(f"{self._what} works on diffusers' Attention modules (diffusers "
                            f"{_compat.diffusers_version()}), got {type(attn).__name__}")
        unsupported = [name for name, bad in (
            ("encoder_hidden_states (cross-attention)", encoder_hidden_states is not None),
            ("attention_mask", attention_mask is not None), ("spatial_norm", attn.spatial_norm is not None),
            ("group_norm", attn.group_norm is not None), ("residual_connection", attn.residual_connection),
            ("rescale_output_factor != 1", attn.rescale_output_factor != 1.0),
            ("norm_q/norm_k", attn.norm_q is not None or attn.norm_k is not None),
            ("3-D hidden_states", hidden_states.dim() != 3)) if bad]
        if unsupported:
            raise ValueError(f"{self._what} supports plain self-attention only; this call has {unsupported}")
        batch, tokens, _ = hidden_states.shape
        def split(t):
            return t.view(batch, tokens, attn.heads, -1)
        query, key, value = (split(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        grid = self.fixed_grid or self.context.grid
        if grid is None or math.prod(grid) != tokens:
            raise ValueError(f"{self._what}: the token map {grid} does not match the {tokens} tokens; patch the UNet "
                             "with visattn.diffusion.patch (its hooks record each block's map) or pass grid=")
        downsample = self.context.downsample or 1
        agents_h, agents_w = min(self.agent_grid[0], grid[0]), min(self.agent_grid[1], grid[1])
        if downsample > self.max_downsample or 2 * agents_h * agents_w >= tokens:
            out = self._dense(query, key, value)  # AgentSD also keeps dense attention where agents would not pay
        else:
            query_map = query.reshape(batch, *grid, -1).permute(0, 3, 1, 2)  # [B, heads*D, H, W]
            agents = F.adaptive_avg_pool2d(query_map, (agents_h, agents_w)).flatten(2).transpose(1, 2)
            agents = agents.reshape(batch, agents_h * agents_w, attn.heads, -1)
            scale = attn.scale
            # agent_attention uses one scale for both softmaxes; scaling q gives the second one s ** k_scale2.
            query = query * (scale**self.k_scale2 / scale)
            extra = {} if self.backend is None else {"backend": self.backend}
            out = functional.agent_attention(query, key, value, agents, scale=scale, **extra)
            out = out + self.k_shortcut * value
        out = out.reshape(batch, tokens, -1).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


__all__ = ["VIDEO_PATTERNS", "AgentSDAttnProcessor", "FluxNeighborhoodAttnProcessor",
           "HunyuanVideoNeighborhoodAttnProcessor", "LatentGrid", "WanNeighborhoodAttnProcessor", "joint_attention",
           "joint_neighborhood_attention"]
