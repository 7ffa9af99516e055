"""Adapter for unmodified Hugging Face LLaVA-family models (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``), implemented with forward hooks only.

How a prefill (a forward that carries ``pixel_values``) is pruned:

* ``vision`` methods: pre-hooks on the vision encoder layers recompute the [CLS] attention row (``fused_capture``
  methods: store the layer input, all layers scored at once before the projector); a pre-hook on the
  projector replaces the patch features with the ``k`` kept/merged ones, a post-hook writes the ``k`` projected
  tokens into the first ``k`` placeholder slots of each image (so HF's placeholder check holds); a pre-hook on the
  language model then removes the unused slots from ``inputs_embeds`` / ``attention_mask`` / ``position_ids``.
* ``embedding`` methods select on ``inputs_embeds`` in the same language-model pre-hook.
* ``llm`` methods score and drop inside decoder-layer pre-hooks, substituting the layer's hidden states, mask,
  rotary embeddings and position ids for the layers after the drop.

Decode steps on the same KV cache object are translated (mask, positions) so the cache stays consistent.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from visattn.tokenprune.layout import TokenLayout as _Layout
from visattn.tokenprune.layout import attention_mask_4d, compact, image_spans, positions_from_valid
from visattn.tokenprune.layout import select_per_image as _select_per_image
from visattn.tokenprune.recycle import append_recycled
from visattn.tokenprune.methods import LLMPruner, TokenPruner, VisionPruner, VisionZip
from visattn.tokenprune.report import PruneReport, estimate
from visattn.tokenprune import scoring
from visattn.tokenprune.bookkeeping import (image_starts, kept_now, last_valid, layout_index, moved_rows,
                                            per_sample, rater_candidates, rater_rows)
from visattn.tokenprune.scoring import clip_cls_attention, cls_attention_captures, decoder_row_scores


def _hidden_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor, name: str = "hidden_states"):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs[name] = hidden
    return args, kwargs


@dataclass
class _Vision:
    """State of one vision-tower pass (HF may run it before the model forward, e.g. inside ``generate``)."""

    captures: dict = field(default_factory=dict)
    cls_hidden: torch.Tensor | None = None
    kept: list = field(default_factory=list)
    count: int | None = None
    slots_used: int = 0
    extra: dict = field(default_factory=dict)  # adapter-specific state (LLaVA-NeXT VisionZip)


@dataclass
class _Call:
    """State of one prefill forward."""

    image_mask: torch.Tensor
    spans: list[list[tuple[int, int]]]
    vision: _Vision | None = None
    layout: _Layout | None = None
    scores: dict = field(default_factory=dict)
    substitute: dict | None = None
    stage_states: list = field(default_factory=list)
    per_layer: list = field(default_factory=list)
    events: list = field(default_factory=list)
    kept: list | None = None
    pos_in: torch.Tensor | None = None
    lm_len: int = 0
    image_lengths: list = field(default_factory=list)
    stage_layouts: list = field(default_factory=list)  # layout after each drop (kept indices, for the report)
    stage_selected: list = field(default_factory=list)
    score_rows: torch.Tensor | None = None  # (B, R) current indices of the raters (SparseVLM); None: last token
    score_ok: torch.Tensor | None = None  # (B, R) which of them are real
    image_start: torch.Tensor | None = None
    layouts: list = field(default_factory=list)  # distinct layouts the decoder layers saw (per_layer indexes it)
    # host-side bookkeeping of LLM-stage drops (no device readback per stage): current tokens per image and per
    # row, and the padding side
    image_counts: list = field(default_factory=list)
    row_tokens: list = field(default_factory=list)
    right_padded: bool = False


def _last_columns(call: _Call, length: int) -> list[int]:
    """Every row's last valid column in a layout of ``length`` (host: right padding ends at the row's length)."""
    return [n - 1 for n in call.row_tokens] if call.right_padded else [length - 1] * len(call.row_tokens)


@dataclass
class _Bound:
    """What decode steps on the prefill's KV cache need."""

    cache: object
    lm_len: int
    lm_valid: torch.Tensor | None = None  # set when the LM input itself was compacted
    lm_next_pos: torch.Tensor | None = None
    stages: list = field(default_factory=list)  # (layer, valid, next_pos or None)


class LlavaAdapter:
    """Attach a :class:`TokenPruner` to a HF LLaVA / LLaVA-NeXT model with hooks; :meth:`remove` detaches."""

    def __init__(self, model: torch.nn.Module, pruner: TokenPruner, timing: bool = False):
        self.model = model
        self.pruner = pruner
        self.timing = timing
        core = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.core = core
        self.lm = core.language_model
        self.layers = self.lm.layers
        self.text_config = self.lm.config
        cfg = model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = cfg.image_token_index
        self.is_next = hasattr(core, "image_newline")
        self.call: _Call | None = None
        self.vision: _Vision | None = None
        self.events: list = []
        self.bound: _Bound | None = None
        self.decoding = False
        self._last_report: PruneReport | None = None
        self._pending: tuple | None = None  # (call, scoring events) of the last prefill, reported on first access
        self.handles: list = []
        self._cls_cache: dict = {}  # stacked q/k weights of fused [CLS] scoring
        self._validate()
        self._install()

    # ------------------------------------------------------------------------------------------------ setup
    def _vision_layers(self):
        vt = self.core.vision_tower
        vm = getattr(vt, "vision_model", vt)
        return vm.encoder.layers

    def _validate(self) -> None:
        p = self.pruner
        n_llm = len(self.layers)
        if isinstance(p, LLMPruner):
            if hasattr(p, "bind"):
                p.bind(n_llm)
            for st in p.stages():
                if st.layer >= n_llm:
                    raise ValueError(f"layer={st.layer}: the language model has {n_llm} layers (valid: 1..{n_llm - 1})")
        if isinstance(p, VisionPruner):
            if self.is_next and not (hasattr(p, "patch_scores") or isinstance(p, VisionZip)):
                raise NotImplementedError(f"{p.name} on LLaVA-NeXT (anyres packing) is not supported: its merged "
                                          "tokens have no place in the packed crop grid")
            if self.model.config.vision_feature_select_strategy != "default":
                raise NotImplementedError("vision-stage pruning needs vision_feature_select_strategy='default'")
            feat = self.model.config.vision_feature_layer
            if not isinstance(feat, int):
                raise NotImplementedError("vision-stage pruning needs a single vision_feature_layer")
            n_vis = len(self._vision_layers())
            self.capture_layers = p.capture_layers(n_vis)
            hs_index = feat % (n_vis + 1)
            if hs_index == 0:
                raise NotImplementedError("vision_feature_layer selects the embeddings; nothing to score")
            self.feature_layer = hs_index - 1

    def _install(self) -> None:
        h = self.handles
        h.append(self.core.register_forward_pre_hook(self._core_pre, with_kwargs=True))
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True))
        if isinstance(self.pruner, VisionPruner):
            layers = self._vision_layers()
            h.append(self.core.vision_tower.register_forward_pre_hook(self._vision_start))
            for idx in self.capture_layers:
                h.append(layers[idx].register_forward_pre_hook(self._make_vision_pre(idx), with_kwargs=True))
            if self.is_next:
                from visattn.tokenprune.hf_llava_next import install_pack_wrapper

                install_pack_wrapper(self)
                return
            if self.pruner.needs_cls_hidden:
                h.append(layers[self.feature_layer].register_forward_hook(self._vision_feature_post))
            proj = self.core.multi_modal_projector
            h.append(proj.register_forward_pre_hook(self._proj_pre))
            h.append(proj.register_forward_hook(self._proj_post))
        if isinstance(self.pruner, LLMPruner):
            for idx, layer in enumerate(self.layers):
                h.append(layer.register_forward_pre_hook(self._make_layer_pre(idx), with_kwargs=True))

    @property
    def last_report(self) -> PruneReport | None:
        """Report of the last pruned prefill; built on first access, so its bookkeeping stays out of the prefill."""
        if self._pending is not None:
            call, events = self._pending
            self._pending = None
            self._last_report = self._report(call)
            self._last_report._scoring_events = events
        return self._last_report

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.call = self.bound = None

    # ----------------------------------------------------- position hooks (overridden for M-RoPE models)
    def _reindex(self) -> bool:
        return self.pruner.positions == "reindex"

    def _positions_in(self, pos_in: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        return positions_from_valid(valid) if pos_in is None else pos_in.expand(valid.shape[0], -1)

    def _lm_position_kwarg(self, pos: torch.Tensor) -> torch.Tensor:
        return pos

    def _layer_position_kwarg(self, pos: torch.Tensor) -> torch.Tensor | None:
        return pos

    def _rope(self, hidden: torch.Tensor, pos: torch.Tensor):
        return self.lm.rotary_emb(hidden, pos)

    def _next_pos(self, lay: _Layout) -> torch.Tensor:
        return lay.pos.gather(1, last_valid(lay.valid)[:, None]) + 1

    @contextmanager
    def _timed(self):
        if not self.timing:
            yield
            return
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.events.append((start, end))

    # ------------------------------------------------------------------------------------------ vision side
    def _core_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self.call = None
        if pixel_values is None and encoded.get("image") is None:
            return None
        if input_ids is None:
            raise NotImplementedError("tokenprune needs input_ids (not inputs_embeds) to locate image tokens")
        image_mask = input_ids == self.image_token_id
        per_image = None
        if not self.is_next:
            cfg = self.core.vision_tower.config
            per_image = (cfg.image_size // cfg.patch_size) ** 2
        spans = image_spans(image_mask, per_image)
        self.call = _Call(image_mask=image_mask, spans=spans)
        self.call.image_lengths = [e - s for row in spans for s, e in row]
        return None

    def _vision_start(self, module, args):
        self.vision = _Vision()

    def _make_vision_pre(self, idx: int):
        def hook(module, args, kwargs):
            if self.vision is not None and self.pruner.fused_capture:
                self.vision.captures[idx] = _hidden_arg(args, kwargs)  # no ops: scored in _captures
            elif self.vision is not None:
                with self._timed():
                    self.vision.captures[idx] = clip_cls_attention(module, _hidden_arg(args, kwargs))
            return None

        return hook

    def _vision_feature_post(self, module, args, output):
        if self.vision is not None:
            out = output[0] if isinstance(output, tuple) else output
            self.vision.cls_hidden = out[:, 0]

    def _captures(self, vis: _Vision) -> dict:
        """``{idx: (probs, keys)}``; a fused pruner's raw layer inputs are scored here, in one batched call."""
        if not self.pruner.fused_capture:
            return vis.captures
        return cls_attention_captures(self._vision_layers(), vis.captures, self._cls_cache)

    def _proj_pre(self, module, args):
        vis = self.vision
        if vis is None or not vis.captures:
            return None
        patches = args[0]
        k = self.pruner.output_count(patches.shape[1])
        if k >= patches.shape[1]:
            vis.captures = {}
            return None
        with self._timed():
            tokens, kept, info = self.pruner.reduce(patches, vis.cls_hidden, self._captures(vis))
        vis.count, vis.kept, vis.captures = patches.shape[1], list(kept), {}
        return (tokens.to(patches.dtype), *args[1:])

    def _proj_post(self, module, args, output):
        vis = self.vision
        if vis is None or vis.count is None or vis.slots_used:
            return None
        full = output.new_zeros(output.shape[0], vis.count, output.shape[-1])
        full[:, : output.shape[1]] = output
        vis.slots_used = output.shape[1]
        return full

    # ---------------------------------------------------------------------------------------- language model
    def _lm_pre(self, module, args, kwargs):
        call = self.call
        cache = kwargs.get("past_key_values")
        self.decoding = False
        if call is None:
            if self.bound is not None and cache is not None and cache is self.bound.cache:
                self.decoding = True
                if self.bound.lm_valid is not None:
                    self._translate_decode(kwargs)
            return args, kwargs
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("pruning a prefill that continues a non-empty KV cache is not supported")
        embeds = kwargs["inputs_embeds"]
        bsz, length = embeds.shape[:2]
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise NotImplementedError("tokenprune needs a 2D attention_mask (or none)")
        valid = am.bool() if am is not None else torch.ones(bsz, length, dtype=torch.bool, device=embeds.device)
        pos_in = self._positions_in(kwargs.get("position_ids"), valid)
        call.pos_in, call.lm_len = pos_in, length
        image_id = torch.full((bsz, length), -1, dtype=torch.long, device=embeds.device)
        j = 0
        for b, row in enumerate(call.spans):
            for s, e in row:
                image_id[b, s:e] = j
                j += 1
        orig = torch.arange(length, device=embeds.device).expand(bsz, -1)
        call.layout = _Layout(valid, pos_in, image_id, orig)
        call.image_start = image_starts(image_id, j)
        self.bound = _Bound(cache=cache, lm_len=length)
        if self.pruner.stage == "llm":
            stats = torch.cat([valid.sum(1), (~valid[:, -1]).any().long()[None]]).tolist()  # one sync per call
            call.row_tokens, call.right_padded = stats[:-1], bool(stats[-1])
            call.image_counts = list(call.image_lengths)
            if hasattr(self.pruner, "rater_scores"):
                with self._timed():
                    cands, lo, hi = rater_candidates(call.spans, call.row_tokens, call.right_padded, length)
                    call.score_rows, call.score_ok = rater_rows(self.pruner.rater_scores, embeds, image_id, valid,
                                                                cands, lo, hi, _last_columns(call, length))
            return args, kwargs
        vis, self.vision = self.vision, None
        if self.pruner.stage == "vision" and vis is None:
            raise RuntimeError("tokenprune: the vision tower did not run through the pruning hooks")
        if self.pruner.stage == "vision" and self.is_next:
            from visattn.tokenprune.hf_llava_next import next_keep

            keep, kept = next_keep(image_id, call.spans, vis)
        elif self.pruner.stage == "vision":
            keep, kept = image_id < 0, []
            j = 0
            for b, row in enumerate(call.spans):
                kept_row = []
                for s, e in row:
                    n_slots = e - s if vis.count is None else vis.slots_used
                    keep[b, s : s + n_slots] = True
                    kept_row.append(torch.arange(e - s, device=embeds.device) if vis.count is None else vis.kept[j])
                    j += 1
                kept.append(kept_row)
        else:
            with self._timed():
                keep, sel, _ = _select_per_image(image_id, valid, call.image_lengths, call.image_lengths,
                                              lambda g, x: self.pruner.select(embeds.flatten(0, 1)[x]))
            kept = per_sample(call.spans, sel)
        call.kept = kept
        if bool(keep[valid].all()):
            return args, kwargs
        comp = compact(keep, valid)
        reindex = self._reindex()
        old, new = call.layout, call.layout.apply(comp, reindex)
        call.layout = new
        kwargs["inputs_embeds"] = comp.take(embeds)
        kwargs["attention_mask"] = new.valid.to(am.dtype if am is not None else torch.long)
        kwargs["position_ids"] = self._lm_position_kwarg(new.pos)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(new.valid.shape[1], device=embeds.device)
        self.bound.lm_valid = new.valid
        self.bound.lm_next_pos = self._next_pos(new if reindex else old)
        return args, kwargs

    def _translate_decode(self, kwargs: dict) -> None:
        bound = self.bound
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        past = bound.cache.get_seq_length()
        new_len = bound.lm_valid.shape[1]
        extra = past + q - new_len
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() == 2:
            tail = am[:, bound.lm_len :].bool()
        else:
            tail = torch.ones(bound.lm_valid.shape[0], extra, dtype=torch.bool, device=bound.lm_valid.device)
        kv_valid = torch.cat([bound.lm_valid, tail], 1)
        if am is not None or not bool(kv_valid.all()):
            kwargs["attention_mask"] = kv_valid.long()
        offset = past - new_len + torch.arange(q, device=kv_valid.device)
        kwargs["position_ids"] = bound.lm_next_pos + offset[None]
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = past + torch.arange(q, device=kv_valid.device)

    def _lm_post(self, module, args, kwargs, output):
        call = self.call
        if call is not None:
            cache = getattr(output, "past_key_values", None)
            if self.bound is not None:
                self.bound.cache = cache
                if cache is None:
                    self.bound = None
            self._pending, self.events = (call, self.events), []
        self.call = None
        self.decoding = False
        return None

    # ---------------------------------------------------------------------------------------- decoder layers
    def _make_layer_pre(self, idx: int):
        stages = self.pruner.stages()

        def hook(module, args, kwargs):
            if self.call is not None:
                return self._layer_prefill(idx, module, stages, args, kwargs)
            if self.decoding and self.bound is not None and self.bound.stages:
                self._layer_decode(idx, args, kwargs)
            return args, kwargs

        return hook

    def _substitute(self, kwargs: dict, sub: dict) -> None:
        for key, value in sub.items():
            if key == "cache_position" and kwargs.get(key) is None:
                continue
            kwargs[key] = value

    def _layer_prefill(self, idx, module, stages, args, kwargs):
        call = self.call
        hidden = _hidden_arg(args, kwargs)
        if call.substitute is not None:
            self._substitute(kwargs, call.substitute)
        lay = call.layout
        call.per_layer.append(layout_index(call, lay))
        for stage_index, st in enumerate(stages):  # in order: an earlier stage's drop precedes a later scoring
            if st.score_layer == idx:
                with self._timed():
                    cos, sin = kwargs["position_embeddings"]
                    rows, row_ok = self._score_rows(call, lay)
                    call.scores[stage_index] = decoder_row_scores(module, hidden, rows, row_ok, cos, sin, lay.valid)
            if st.layer != idx:
                continue
            with self._timed():
                keep, sel, last_kept = self._select_stage(call, lay, stage_index)
            call.stage_selected.append(per_sample(call.spans, list(sel)))
            removed = [n - x.shape[-1] for n, x in zip(call.image_counts, sel)]
            if not any(removed):
                continue
            made = [self.pruner.recycled_count(m) if hasattr(self.pruner, "recycled_count") else 0 for m in removed]
            row_of = [b for b, row in enumerate(call.spans) for _ in row]
            for j, (m, c) in enumerate(zip(removed, made)):
                call.row_tokens[row_of[j]] += c - m
            call.image_counts = [x.shape[-1] + c for x, c in zip(sel, made)]
            new_len = max(max(call.row_tokens), 1)
            lay, hidden, comp, order = append_recycled(self.pruner, row_of, lay, hidden, keep,
                                                       call.scores[stage_index], removed, made, last_kept,
                                                       new_len, call.right_padded, timed=self._timed)
            comp = compact(keep, lay.valid, order, new_len, call.right_padded) if comp is None else comp
            if call.score_rows is not None:  # raters are text: never dropped, only moved
                call.score_rows = moved_rows(call.score_rows, comp, lay.valid.shape[1])
            lay = lay.apply(comp, self._reindex())
            call.layout = lay
            hidden = comp.take(hidden)
            impl = self.text_config._attn_implementation
            cos, sin = self._rope(hidden, lay.pos)
            call.substitute = {
                "attention_mask": attention_mask_4d(lay.valid, hidden.shape[1], impl, hidden.dtype,
                                                    all_valid=min(call.row_tokens) == new_len),
                "position_embeddings": (cos, sin),
                "position_ids": self._layer_position_kwarg(lay.pos),
                "cache_position": torch.arange(hidden.shape[1], device=hidden.device),
            }
            self._substitute(kwargs, call.substitute)
            next_pos = self._next_pos(lay)
            self.bound.stages.append((idx, lay.valid, next_pos))
            call.stage_layouts.append(lay)
            call.per_layer[-1] = layout_index(call, lay)
        return _with_hidden(args, kwargs, hidden)

    def _select_stage(self, call: _Call, lay: _Layout, stage_index: int) -> tuple:
        """(keep mask, kept indices per image, last kept flat index per image) of one LLM-stage drop: one Triton
        launch on CUDA (ties to the earlier token), else the per-image ``pruner.select`` on eager ops."""
        from visattn.kernels import select

        scores = call.scores[stage_index]
        if scoring.llm_kernel_runs("top-k", lambda: select.why_not(scores)):
            ks = [self.pruner.stage_keep(stage_index, n, n0) for n, n0 in zip(call.image_counts, call.image_lengths)]
            keep, sel, last = select.topk_per_image(scores, lay.image, lay.valid, ks, [len(row) for row in call.spans])
            return keep, (list(sel) if len(set(ks)) == 1 else [sel[j, :k] for j, k in enumerate(ks)]), last
        flat = scores.flatten()
        return _select_per_image(lay.image, lay.valid, call.image_counts, call.image_lengths,
                                 lambda g, x: self.pruner.select(stage_index, flat[x], call.image_lengths[g]))

    def _score_rows(self, call: _Call, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """Query rows (B, R) for the scores and which are real: the raters if any, else the last valid token
        (known on the host: the last column, or each right-padded row's length - 1)."""
        if call.score_rows is not None:
            return call.score_rows, call.score_ok
        bsz, length = lay.valid.shape
        last = torch.tensor(_last_columns(call, length), device=lay.valid.device)[:, None]
        return last, torch.ones(bsz, 1, dtype=torch.bool, device=lay.valid.device)

    def _layer_decode(self, idx, args, kwargs):
        bound = self.bound
        stage = None
        for st in bound.stages:
            if st[0] <= idx:
                stage = st
        if stage is None:
            return
        _, valid, next_pos = stage
        hidden = _hidden_arg(args, kwargs)
        q = hidden.shape[1]
        extra = bound.cache.get_seq_length(0) - bound.lm_len
        kv_valid = torch.cat([valid, valid.new_ones(valid.shape[0], extra)], 1)
        impl = self.text_config._attn_implementation
        sub = {"attention_mask": attention_mask_4d(kv_valid, q, impl, hidden.dtype)}
        pos = next_pos + (extra - q) + torch.arange(q, device=hidden.device)[None]
        if self._reindex():
            sub["position_embeddings"] = self._rope(hidden, pos)
            sub["position_ids"] = pos
        sub["cache_position"] = valid.shape[1] + (extra - q) + torch.arange(q, device=hidden.device)
        self._substitute(kwargs, sub)

    # ---------------------------------------------------------------------------------------------- report
    def _report(self, call: _Call) -> PruneReport:
        """Build the report of ``call`` (device readbacks happen here, after the prefill)."""
        lay = call.layout
        bsz = lay.valid.shape[0]
        visual = [sum(e - s for s, e in row) for row in call.spans]
        extra = {}
        if self.pruner.stage == "llm":
            kept = kept_now(call.spans, lay, call.image_start)
            extra["stage_kept"] = [kept_now(call.spans, x, call.image_start) for x in call.stage_layouts]
            extra["stage_selected"] = call.stage_selected
            snaps = torch.stack([torch.stack([x.valid.sum(1), ((x.image >= 0) & x.valid).sum(1)])
                                 for x in call.layouts]).tolist() if call.layouts else []  # one sync
            tokens = [[snaps[i][0][b] for i in call.per_layer] for b in range(bsz)]
            vis = [[snaps[i][1][b] for i in call.per_layer] for b in range(bsz)]
        else:
            kept = call.kept or [[] for _ in range(bsz)]
            n_layers = len(self.layers)
            n_valid = lay.valid.sum(1).tolist()
            n_vis = ((lay.image >= 0) & lay.valid).sum(1).tolist()
            tokens = [[n_valid[b]] * n_layers for b in range(bsz)]
            vis = [[n_vis[b]] * n_layers for b in range(bsz)]
        avg, saved = estimate(tokens, self.text_config, self.pruner.name, visual, vis)
        rep = PruneReport(
            method=self.pruner.name,
            visual_tokens=visual,
            visual_tokens_kept=[v[-1] for v in vis],
            visual_tokens_layer_avg=avg,
            flops_saved=saved,
            kept_indices=kept,
            extra=extra,
        )
        return rep
