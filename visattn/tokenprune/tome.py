"""ToMe (Token Merging, Bolya et al. 2023) inside vision towers: HF ``CLIPVisionModel`` and open_clip
``VisionTransformer``, standalone or as the vision tower of a HF ``LlavaForConditionalGeneration``
(:class:`visattn.tokenprune.hf_llava.ToMeLlavaAdapter`).

In every patched encoder layer, after the attention residual and before the MLP:

* the similarity metric is the layer's attention keys averaged over heads (exact: captured from the layer's own
  key projection, no attention matrix);
* tokens alternate into sets A (even positions) and B (odd); each A token's best B partner by cosine similarity is
  found, the ``r`` A tokens with the highest best-similarity are merged into their partners ([CLS], token 0, is
  never merged); the remaining tokens are ordered as *unmerged A tokens, then B tokens*;
* merging is a size-weighted average; every token carries a running ``size`` (number of patches it holds);
* proportional attention adds ``log(size)`` of each key to the attention logits through a ``(B, 1, 1, N)`` additive
  mask, so the fused SDPA path stays on (flash-attention kernels that take no float mask are not supported).
"""

from __future__ import annotations

import numbers
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.report import PruneReport


# ------------------------------------------------------------------------------------------------ the method
@register_method("tome", "token-merging")
class ToMe(TokenPruner):
    """Merge ``r`` tokens per vision-tower layer.

    ``r``: an int (same for every layer, optionally bent by ``inflect`` in [-1, 1] into a linear schedule whose
    mean is ``r``, as ToMe's ``(r, inflect)``), or a per-layer list (shorter lists are padded with zeros). In every
    layer ``r`` is clamped to half of the mergeable tokens. ``trace_source`` records which original patches each
    output token holds (``last_report(model).extra["source"]``). ``prop_attn`` turns proportional attention on.
    """

    name = "tome"
    capabilities = Capabilities(stage="vision", output="merged", tower_merge=True, standalone_tower=True)
    positions = "reindex"

    def __init__(
        self,
        r: int | Sequence[int] = 8,
        trace_source: bool = False,
        prop_attn: bool = True,
        inflect: float = 0.0,
    ):
        self.r = _check_r(r)
        if isinstance(inflect, bool) or not isinstance(inflect, numbers.Real) or not -1.0 <= float(inflect) <= 1.0:
            raise ValueError(f"inflect={inflect!r}: expected a float in [-1, 1]")
        if isinstance(self.r, list) and inflect:
            raise ValueError(f"inflect={inflect!r}: only allowed with an int r")
        for nm, v in (("trace_source", trace_source), ("prop_attn", prop_attn)):
            if not isinstance(v, bool):
                raise ValueError(f"{nm}={v!r}: expected a bool")
        self.trace_source, self.prop_attn, self.inflect = trace_source, prop_attn, float(inflect)

    def schedule(self, num_layers: int) -> list[int]:
        """Requested ``r`` for each of ``num_layers`` layers (before the per-layer clamp)."""
        if isinstance(self.r, list):
            if len(self.r) > num_layers:
                raise ValueError(f"r={self.r!r}: {len(self.r)} values for a tower with {num_layers} layers")
            return self.r + [0] * (num_layers - len(self.r))
        if num_layers == 1 or not self.inflect:
            return [self.r] * num_layers
        lo = int(self.r * (1.0 - self.inflect))
        hi = 2 * self.r - lo
        return [int(lo + (hi - lo) / (num_layers - 1) * i) for i in range(num_layers)]


def _check_r(r: object) -> int | list[int]:
    def ok(v: object) -> bool:
        return not isinstance(v, bool) and isinstance(v, numbers.Integral) and int(v) >= 0

    if ok(r):
        return int(r)
    if isinstance(r, (list, tuple)) and len(r) > 0 and all(ok(v) for v in r):
        return [int(v) for v in r]
    raise ValueError(f"r={r!r}: expected an int >= 0 or a non-empty list of ints >= 0 (one per layer)")


# ------------------------------------------------------------------------------- matching and merging (pure)
@dataclass
class Matching:
    """One bipartite soft matching: indices into set A (even tokens) and set B (odd tokens), each (B, ·)."""

    r: int
    unmerged: torch.Tensor  # A tokens that stay, in output order
    src: torch.Tensor  # A tokens merged away
    dst: torch.Tensor  # their B partners


def bipartite_matching(metric: torch.Tensor, r: int, protect_first: bool = True) -> Matching | None:
    """Match ``metric`` (B, N, D) tokens as ToMe does; None when nothing is merged (``r`` clamped to
    ``(N - protected) // 2``)."""
    n = metric.shape[1]
    r = min(r, (n - int(protect_first)) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        sim = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
        if protect_first:
            sim[:, 0, :] = float("-inf")
        best, partner = sim.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, rest = order[:, :r], order[:, r:]
        if protect_first:
            rest = rest.sort(dim=-1).values  # keeps [CLS] first
        return Matching(r, rest, src, partner.gather(1, src))


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def merge_tokens(x: torch.Tensor, m: Matching, reduce: str = "sum") -> torch.Tensor:
    """Apply matching ``m`` to ``x`` (B, N, C): unmerged A tokens, then B tokens with their sources reduced in."""
    a, b = x[:, ::2], x[:, 1::2]
    moved = _take(a, m.src)
    b = b.scatter_reduce(1, m.dst[..., None].expand(-1, -1, x.shape[-1]), moved, reduce=reduce)
    return torch.cat([_take(a, m.unmerged), b], 1)


def survivors(x: torch.Tensor, m: Matching) -> torch.Tensor:
    """The identity of each output token (its B or unmerged-A token), for per-token labels ``x`` (B, N, ...)."""
    flat = x if x.dim() == 3 else x[..., None]
    out = torch.cat([_take(flat[:, ::2], m.unmerged), flat[:, 1::2]], 1)
    return out if x.dim() == 3 else out[..., 0]


def merge_weighted(x: torch.Tensor, size: torch.Tensor | None, m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge; ``size`` (B, N, 1) (None = all ones). Returns (tokens, new sizes)."""
    if size is None:
        size = x.new_ones(*x.shape[:2], 1)
    total = merge_tokens(x * size, m, "sum")
    size = merge_tokens(size, m, "sum")
    return total / size, size


@dataclass
class ThresholdMatching:
    """One bipartite matching with a similarity threshold (DyMU): every row merges its own number of A tokens.

    Rows may be padded (``valid``); the output keeps each row's tokens first, in ToMe's order (unmerged A tokens
    ascending, then B tokens), padded to ``width``."""

    merged: torch.Tensor  # (B, Na) bool: A tokens merged away
    partner: torch.Tensor  # (B, Na): every A token's best B partner
    order: torch.Tensor  # (B, N): indices into cat([A, B]) that put each row's kept tokens first
    counts: torch.Tensor  # (B,) tokens per row after merging
    width: int  # the longest row (host int)


def threshold_matching(metric: torch.Tensor, valid: torch.Tensor, threshold: float,
                       protect_first: bool = True) -> ThresholdMatching:
    """Match ``metric`` (B, N, D) tokens as ToMe does, but merge in every row each A token whose best cosine
    similarity to a B token is above ``threshold`` (at most ``(n - protected) // 2`` of a row's ``n`` valid
    tokens, the most similar first: DyMU's per-image count). ``valid`` (B, N) marks each row's real tokens,
    which must come first in the row; padding is neither matched nor kept. A row that merges nothing keeps its
    token order."""
    with torch.no_grad():
        best, partner = _best_partners(metric, valid, protect_first)
        cap = (valid.sum(1) - int(protect_first)) // 2
        r = torch.minimum((best > threshold).sum(1), cap).clamp(min=0)
        by_sim = best.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(by_sim).scatter_(1, by_sim, torch.arange(by_sim.shape[1], device=by_sim.device)
                                                 .expand_as(by_sim))
        # a row that merges nothing keeps its order (the official code skips the merge: ToMe's A-then-B order
        # would change the later layers' A / B split)
        return _dynamic_plan(valid, partner, rank < r[:, None], keep_order=r == 0)


def batch_matching(metric: torch.Tensor, valid: torch.Tensor, r: int,
                   protect_first: bool = True) -> tuple[ThresholdMatching | None, float | None]:
    """One step of DyMU's threshold finding (DToMe, the official ``batch_level_bipartite_soft_matching``): the
    ``r · B`` A tokens of the whole batch with the highest best similarity merge (``r`` clamped to ``(N −
    protected) // 2`` of the padded length ``N``), so each row merges its own number; returns the matching and
    this batch's threshold, the best similarity left unmerged clamped at 0 (``(None, None)`` when ``r ≤ 0``).
    Every row takes ToMe's A-then-B order, as the official batched code."""
    r = min(r, (metric.shape[1] - int(protect_first)) // 2)
    if r <= 0:
        return None, None
    with torch.no_grad():
        best, partner = _best_partners(metric, valid, protect_first)
        flat = best.flatten()
        by_sim = flat.argsort(descending=True, stable=True)
        rb = r * best.shape[0]
        threshold = max(float(flat[by_sim[min(rb, flat.numel() - 1)]]), 0.0)
        merged = torch.zeros_like(flat, dtype=torch.bool)
        merged[by_sim[:rb]] = True
        merged = merged.view_as(best) & torch.isfinite(best)  # never a padding or [CLS] row
        stay = torch.zeros(best.shape[0], dtype=torch.bool, device=best.device)
        return _dynamic_plan(valid, partner, merged, keep_order=stay), threshold


def _best_partners(metric: torch.Tensor, valid: torch.Tensor, protect_first: bool) -> tuple:
    """Every A token's best cosine similarity to a B token and that partner, (B, Na) each; padding and the
    protected first token get -inf."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    va, vb = valid[:, ::2], valid[:, 1::2]
    sim = sim.masked_fill(~(va[:, :, None] & vb[:, None, :]), float("-inf"))
    if protect_first:
        sim[:, 0, :] = float("-inf")
    return sim.max(dim=-1)


def _dynamic_plan(valid: torch.Tensor, partner: torch.Tensor, merged: torch.Tensor,
                  keep_order: torch.Tensor) -> ThresholdMatching:
    """The matching that merges the ``merged`` A tokens: each row's kept tokens first in ToMe's order (unmerged A,
    then B), or in their own order where ``keep_order`` (rows that merge nothing)."""
    va, vb = valid[:, ::2], valid[:, 1::2]
    keep = torch.cat([va & ~merged, vb], 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    pos = torch.arange(order.shape[1], device=order.device)
    same = torch.where(pos % 2 == 0, pos // 2, va.shape[1] + pos // 2)
    order = torch.where(keep_order[:, None], same[None], order)
    counts = keep.sum(1)
    return ThresholdMatching(merged, partner, order, counts, int(counts.max()))


def merge_dynamic(x: torch.Tensor, m: ThresholdMatching, reduce: str = "sum",
                  deterministic: bool | None = None) -> torch.Tensor:
    """Apply ``m`` to ``x`` (B, N, C): merged A tokens reduced into their partners, then each row's kept tokens
    first, (B, width, C); positions past a row's count hold leftovers (mask them with the row counts).

    ``reduce="sum"`` with ``deterministic`` (default: on CUDA) adds the merged A tokens into their partners with
    a batched one-hot matmul (fp32 or wider accumulation, one rounding) instead of ``scatter_reduce``, whose CUDA
    atomics add in a different order on every call: DyMU's next layers compare similarities against a threshold, so a
    last-bit difference can move a token across it and change a row's token count from call to call (then
    every shape after it, and each shape-keyed cache, changes too). Elsewhere the scatter adds in index order."""
    a, b = x[:, ::2], x[:, 1::2]
    if deterministic is None:
        deterministic = x.is_cuda
    if reduce == "sum" and deterministic:
        onehot = (m.partner[..., None] == torch.arange(b.shape[1], device=x.device)) & m.merged[..., None]
        acc = torch.promote_types(x.dtype, torch.float32)
        added = torch.bmm(onehot.transpose(1, 2).to(acc), a.to(acc))
        return _take(torch.cat([a, (b.to(acc) + added).to(x.dtype)], 1), m.order)[:, : m.width]
    moved = torch.where(m.merged[..., None], a, torch.zeros_like(a))
    b = b.scatter_reduce(1, m.partner[..., None].expand(-1, -1, x.shape[-1]), moved, reduce=reduce)
    return _take(torch.cat([a, b], 1), m.order)[:, : m.width]


def survivors_dynamic(x: torch.Tensor, m: ThresholdMatching) -> torch.Tensor:
    """:func:`survivors` for a :class:`ThresholdMatching`: labels ``x`` (B, N) of each output token, (B, width)."""
    return torch.cat([x[:, ::2], x[:, 1::2]], 1).gather(1, m.order)[:, : m.width]


# -------------------------------------------------------------------------------------------- per-call state
@dataclass
class _State:
    size: torch.Tensor | None = None  # (B, N, 1)
    origin: torch.Tensor | None = None  # (B, N) original index of each token's surviving identity
    source: torch.Tensor | None = None  # (B, N, N0) if trace_source
    keys: torch.Tensor | None = None
    counts: list[int] = field(default_factory=list)  # tokens after each layer
    row_counts: list[torch.Tensor] = field(default_factory=list)  # (B,) tokens per row after each layer (DyMU)
    valid: torch.Tensor | None = None  # (B, N) real tokens once rows have different lengths (DyMU)
    origins: list[torch.Tensor] = field(default_factory=list)  # origin after each layer
    layer_source: torch.Tensor | None = None  # source after the adapter's ``source_layer``
    n0: int = 0


def _tower_flops(n: int, width: int, inter: int) -> float:
    return float(2 * n * width * 4 * width + 2 * n * 2 * width * inter + 4 * n * n * width)


class ToMeAdapter:
    """Patch the encoder layers of a CLIP-style tower with ToMe (instance ``forward`` overrides; ``remove``
    restores them). ``model`` is a HF ``CLIPVisionModel``, an open_clip ``VisionTransformer`` or ``CLIP``.
    ``source_layer``: also trace the sources and report them as they are after that layer
    (``extra["layer_source"]``, (B, N, N0); the LLaVA adapter's merge map for DyMU's virtual unmerging)."""

    def __init__(self, model: torch.nn.Module, pruner: TokenPruner, source_layer: int | None = None):
        if not isinstance(pruner, TokenPruner) or not pruner.capabilities.tower_merge:
            raise ValueError(f"pruner={pruner!r}: ToMeAdapter needs a method with capabilities.tower_merge")
        self.model, self.pruner, self.source_layer = model, pruner, source_layer
        self.kind, self.encoder, self.layers = _locate(model)
        self.schedule = pruner.schedule(len(self.layers))
        self.thresholds = (pruner.layer_thresholds(len(self.layers)) if pruner.capabilities.dynamic_merge
                           else [None] * len(self.layers))
        self.state: _State | None = None
        self.last_report: PruneReport | None = None
        self.handles: list = []
        self.patched: list[torch.nn.Module] = []
        self.handles.append(self.encoder.register_forward_pre_hook(self._start, with_kwargs=True))
        self.handles.append(self.encoder.register_forward_hook(self._finish))
        for idx, layer in enumerate(self.layers):
            if self.kind == "hf":
                self.handles.append(layer.self_attn.k_proj.register_forward_hook(self._keep_keys))
                layer.forward = types.MethodType(_hf_forward(self, idx, type(layer).forward), layer)
            else:
                layer.forward = types.MethodType(_oc_forward(self, idx, type(layer).forward), layer)
            self.patched.append(layer)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for layer in self.patched:
            del layer.forward
        self.handles.clear()
        self.patched.clear()
        self.state = None

    # ---------------------------------------------------------------------------------------------- hooks
    def _start(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("inputs_embeds", kwargs.get("x"))
        self.state = _State()
        if x is not None and x.dim() == 3:
            if self.kind == "oc" and not self.encoder.batch_first:
                raise ValueError("model: open_clip transformer with batch_first=False is not supported")
            b, n = x.shape[:2]
            self.state.n0 = n
            self.state.origin = torch.arange(n, device=x.device).expand(b, n)
            if self.pruner.trace_source or self.source_layer is not None:
                self.state.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)

    def _finish(self, module, args, output) -> None:
        st, self.state = self.state, None
        if st is None or not st.counts:
            return
        b = st.origin.shape[0]
        n0 = st.n0
        width = self.layers[0].mlp[0].in_features if self.kind == "oc" else self.layers[0].mlp.fc1.in_features
        inter = self.layers[0].mlp[0].out_features if self.kind == "oc" else self.layers[0].mlp.fc1.out_features
        rows = torch.stack(st.row_counts, 1).tolist()  # (B, layers), one readback
        full = _tower_flops(n0, width, inter)
        ins = [[n0] + row[:-1] for row in rows]
        saved = [1.0 - sum(_tower_flops(n, width, inter) for n in row) / (len(row) * full) for row in ins]
        kept = [[(st.origin[i, 1 : rows[i][-1]] - 1)] for i in range(b)]
        extra = {"tokens_per_layer": st.counts, "size": st.size, "origins": st.origins, "flops_scope": "vision tower"}
        if self.pruner.capabilities.dynamic_merge:
            extra.update(row_tokens_per_layer=rows, valid=st.valid)
        if st.source is not None and self.pruner.trace_source:
            extra["source"] = st.source
        if self.source_layer is not None:
            extra["layer_source"] = st.layer_source
        self.last_report = PruneReport(
            method=self.pruner.name,
            visual_tokens=[n0 - 1] * b,
            visual_tokens_kept=[row[-1] - 1 for row in rows],
            visual_tokens_layer_avg=[sum(n - 1 for n in row) / len(row) for row in ins],
            flops_saved=saved,
            kept_indices=kept,
            extra=extra,
        )

    def _keep_keys(self, module, args, output) -> None:
        if self.state is not None:
            self.state.keys = output

    # ------------------------------------------------------------------------------------------ layer body
    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention mask (B, 1, 1, N): log(size) per key with proportional attention, the dtype's
        minimum for padding keys (rows of different lengths), or None when neither applies."""
        st = self.state
        if st is None or st.size is None:
            return None
        bias = st.size.log()[:, None, None, :, 0].to(dtype) if self.pruner.prop_attn else None
        if st.valid is not None:
            pad = (~st.valid)[:, None, None, :]
            bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device) if bias is None else bias
            bias = bias.masked_fill(pad, torch.finfo(dtype).min)
        return bias

    def after_attention(self, idx: int, x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
        """Merge ``x`` (the layer's state after the attention residual) with the keys' head mean as metric."""
        st = self.state
        metric = keys.view(*keys.shape[:2], heads, -1).mean(2)
        if self.thresholds[idx] is not None:
            x = self._merge_threshold(idx, x, metric, self.thresholds[idx])
        else:
            m = bipartite_matching(metric, self.schedule[idx], protect_first=True)
            if m is not None:
                if st.source is not None:
                    st.source = merge_tokens(st.source, m, "amax")
                st.origin = survivors(st.origin, m)
                x, st.size = merge_weighted(x, st.size, m)
        self._count(x.shape[1])
        return x

    def _count(self, width: int) -> None:
        st = self.state
        st.counts.append(width)
        st.row_counts.append(st.valid.sum(1) if st.valid is not None
                             else torch.full((st.origin.shape[0],), width, device=st.origin.device))
        st.origins.append(st.origin)
        if len(st.counts) - 1 == self.source_layer:
            st.layer_source = st.source

    def _merge_threshold(self, idx: int, x: torch.Tensor, metric: torch.Tensor, threshold: float) -> torch.Tensor:
        """DyMU's merge of ``x`` (B, N, C) in layer ``idx``: the method's ``match`` (every row merges its A tokens
        above ``threshold``), size-weighted; rows are padded to the longest and ``state.valid`` marks their
        tokens."""
        st = self.state
        valid = st.valid if st.valid is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        m = self.pruner.match(idx, metric, valid, threshold)
        if m is None:
            return x
        size = st.size if st.size is not None else x.new_ones(*x.shape[:2], 1)
        total = merge_dynamic(x * size, m, "sum")
        size = merge_dynamic(size, m, "sum")
        st.valid = torch.arange(m.width, device=x.device)[None] < m.counts[:, None]
        st.size = torch.where(st.valid[..., None], size, torch.ones_like(size))
        if st.source is not None:
            st.source = merge_dynamic(st.source, m, "amax") * st.valid[..., None]
        st.origin = survivors_dynamic(st.origin, m)
        return torch.where(st.valid[..., None], total / st.size, torch.zeros_like(total))

    def untouched(self, idx: int) -> bool:
        """True when layer ``idx`` can run unpatched (no merge, no sizes yet)."""
        st = self.state
        return st is None or (st.size is None and self.schedule[idx] == 0 and self.thresholds[idx] is None)


def _hf_forward(adapter: ToMeAdapter, idx: int, orig):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if adapter.untouched(idx):
            out = orig(self, hidden_states, attention_mask, **kwargs)
            if adapter.state is not None:
                adapter._count(out.shape[1])
            return out
        bias = adapter.bias(hidden_states.dtype)
        mask = attention_mask if bias is None else (bias if attention_mask is None else attention_mask + bias)
        attn_out, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=mask, **kwargs)
        x = hidden_states + attn_out
        x = adapter.after_attention(idx, x, adapter.state.keys, self.self_attn.num_heads)
        return x + self.mlp(self.layer_norm2(x))

    return forward


def _oc_forward(adapter: ToMeAdapter, idx: int, orig):
    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if adapter.untouched(idx) or k_x is not None or v_x is not None:
            out = orig(self, q_x, k_x, v_x, attn_mask)
            if adapter.state is not None:
                adapter._count(out.shape[1])
            return out
        if attn_mask is not None:
            raise ValueError("attn_mask: ToMe on an open_clip tower with an attention mask is not supported")
        mha = self.attn
        bsz, n, c = q_x.shape
        heads = mha.num_heads
        q, k, v = F.linear(self.ln_1(q_x), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.view(bsz, n, heads, -1).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=adapter.bias(q_x.dtype))
        x = q_x + self.ls_1(mha.out_proj(o.transpose(1, 2).reshape(bsz, n, c)))
        x = adapter.after_attention(idx, x, k, heads)
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    return forward


def _locate(model: torch.nn.Module) -> tuple[str, torch.nn.Module, torch.nn.ModuleList]:
    """(kind, encoder module, layers) of a supported tower; ValueError naming ``model`` otherwise."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if "CLIP" in names and hasattr(model, "visual") and type(model).__module__.startswith("open_clip"):
        model = model.visual
        names = {cls.__name__ for cls in type(model).__mro__}
    if "VisionTransformer" in names and type(model).__module__.startswith("open_clip"):
        blocks = model.transformer.resblocks
        for blk in blocks:
            mha = getattr(blk, "attn", None)
            if type(blk).__name__ != "ResidualAttentionBlock" or not isinstance(mha, torch.nn.MultiheadAttention):
                raise ValueError(f"model={type(model).__name__}: only default open_clip ResidualAttentionBlocks "
                                 f"(nn.MultiheadAttention) are supported, got {type(blk).__name__}")
            if not mha._qkv_same_embed_dim or not mha.batch_first:
                raise ValueError(f"model={type(model).__name__}: needs batch_first packed-qkv attention")
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError(f"model={type(model).__name__}: attentional pooling towers are not supported")
        return "oc", model.transformer, blocks
    vm = getattr(model, "vision_model", model)
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if layers is not None and len(layers) and all(type(x).__name__ == "CLIPEncoderLayer" for x in layers):
        impl = getattr(vm.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager", None):
            raise ValueError(f"model={type(model).__name__}: attn_implementation={impl!r} takes no additive mask; "
                             "use 'sdpa' or 'eager'")
        return "hf", vm.encoder, layers
    raise ValueError(f"model={type(model).__name__}: ToMe supports HF CLIPVisionModel, open_clip VisionTransformer / "
                     "CLIP, and LlavaForConditionalGeneration with a CLIP tower")
