"""Base adapter for unmodified Hugging Face vision-language models, with forward hooks only.

The language-model side is shared by every family: LLM-stage methods (FastV, PyramidDrop, SparseVLM) score and
drop inside decoder-layer pre-hooks, substituting the layer's hidden states, mask, rotary embeddings and position
ids for the layers after the drop; vision- and embedding-stage methods remove the unused visual slots from
``inputs_embeds`` / ``attention_mask`` / ``position_ids`` in a language-model pre-hook. Decode steps on the same KV
cache object are translated (mask, positions) so the cache stays consistent. Every assumption about transformers
is checked through :mod:`visattn.tokenprune.hf_contract`.

What differs per family lives in the siblings, which override a few methods: how many placeholder tokens one
image has (``_tokens_per_image``), how the vision output is reduced (``_install_vision_output``), where the kept
visual tokens sit in the language-model input (``_vision_keep``), the checks of vision-stage methods
(``_validate_vision``) and the position ids (M-RoPE): :class:`~visattn.tokenprune.hf_llava.LlavaAdapter`,
:class:`~visattn.tokenprune.hf_llava_next.LlavaNextAdapter`, :class:`~visattn.tokenprune.hf_qwen2vl.QwenVLAdapter`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from visattn.tokenprune import kernels
from visattn.tokenprune.bookkeeping import (
    image_starts,
    kept_now,
    last_valid,
    layout_index,
    moved_rows,
    per_sample,
    rater_candidates,
    rater_rows,
)
from visattn.tokenprune.hf_contract import (
    check_cache_after_prefill,
    check_cache_kind,
    check_decoder_layers,
    check_layer_call,
    check_version,
    language_model_contract,
)
from visattn.tokenprune.layout import TokenLayout as _Layout
from visattn.tokenprune.layout import attention_mask_4d, compact, image_spans, positions_from_valid
from visattn.tokenprune.layout import select_per_image as _select_per_image
from visattn.tokenprune.methods import LLMPruner, TokenPruner, VisionPruner
from visattn.tokenprune.recycle import append_recycled
from visattn.tokenprune.report import PruneReport, estimate
from visattn.tokenprune.scoring import clip_cls_attention, cls_attention_captures, decoder_row_scores
from visattn.tokenprune.state import DecodeBinding, PrefillState, Spans, VisionPass


def _hidden_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor, name: str = "hidden_states"):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs[name] = hidden
    return args, kwargs


def _last_columns(call: PrefillState, length: int) -> list[int]:
    """Every row's last valid column in a layout of ``length`` (host: right padding ends at the row's length)."""
    return [n - 1 for n in call.row_tokens] if call.right_padded else [length - 1] * len(call.row_tokens)


class HFVisionLanguageAdapter:
    """Attach a :class:`TokenPruner` to a HF vision-language model with hooks; :meth:`remove` detaches.

    Subclasses: one per model family (see the module docstring); this class is not used on its own."""

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
        self.call: PrefillState | None = None
        self.vision: VisionPass | None = None
        self.events: list = []
        self.bound: DecodeBinding | None = None
        self.decoding = False
        self._last_report: PruneReport | None = None
        self._pending: tuple | None = None  # (call, scoring events) of the last prefill, reported on first access
        self.handles: list = []
        self._cls_cache: dict = {}  # stacked q/k weights of fused [CLS] scoring
        check_version()
        self.contract = language_model_contract(self.lm)
        if isinstance(pruner, LLMPruner):
            check_decoder_layers(self.lm, self.layers)
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
            self._validate_vision(p)
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

    def _validate_vision(self, pruner: VisionPruner) -> None:
        """Family-specific checks of a vision-stage method (raise NotImplementedError)."""

    def _install(self) -> None:
        h = self.handles
        if self.model is not self.core:
            h.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        h.append(self.core.register_forward_pre_hook(self._core_pre, with_kwargs=True))
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True))
        if isinstance(self.pruner, VisionPruner):
            layers = self._vision_layers()
            h.append(self.core.vision_tower.register_forward_pre_hook(self._vision_start))
            for idx in self.capture_layers:
                h.append(layers[idx].register_forward_pre_hook(self._make_vision_pre(idx), with_kwargs=True))
            self._install_vision_output()
        if isinstance(self.pruner, LLMPruner):
            for idx, layer in enumerate(self.layers):
                h.append(layer.register_forward_pre_hook(self._make_layer_pre(idx), with_kwargs=True))

    def _install_vision_output(self) -> None:
        """Hooks that hand the reduced visual tokens of a vision-stage method to the language model."""
        raise NotImplementedError(f"{self.pruner.name}: vision-stage methods are not supported on "
                                  f"{type(self.model).__name__}")

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
    def _model_pre(self, module, args, kwargs):
        """The LM-head wrapper computes a loss from ``labels`` aligned with the unpruned sequence: refuse it."""
        if kwargs.get("labels") is not None and any(kwargs.get(k) is not None for k in self._image_kwargs()):
            raise ValueError("labels: a loss with a pruner attached is not supported (the logits cover the pruned "
                             "sequence, the labels the full one); call tokenprune.remove(model) for training, or "
                             "compute the loss from the returned logits")
        return None

    def _image_kwargs(self) -> tuple[str, ...]:
        return ("pixel_values", "mm_encoder_outputs")

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
        spans = image_spans(image_mask, self._tokens_per_image())
        lengths = [e - s for row in spans for s, e in row]
        self.call = PrefillState(image_mask=image_mask, spans=spans, image_lengths=lengths)
        return None

    def _tokens_per_image(self) -> int | None:
        """Placeholder tokens of one image when fixed (consecutive images then split by it), else None."""
        return None

    def _vision_start(self, module, args):
        self.vision = VisionPass()

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

    def _captures(self, vis: VisionPass) -> dict:
        """``{idx: (probs, keys)}``; a fused pruner's raw layer inputs are scored here, in one batched call."""
        if not self.pruner.fused_capture:
            return vis.captures
        return cls_attention_captures(self._vision_layers(), vis.captures, self._cls_cache)

    # ---------------------------------------------------------------------------------------- language model
    def _lm_pre(self, module, args, kwargs):
        call = self.call
        cache = self.contract.cache_in(kwargs)
        self.decoding = False
        if call is None:
            if self.bound is not None:
                self.contract.check_no_stray_cache(kwargs)
            if self.bound is not None and cache is not None and cache is self.bound.cache:
                self.decoding = True
                if self.bound.lm_valid is not None:
                    self._translate_decode(kwargs)
            return args, kwargs
        check_cache_kind(cache)  # before check_call: a static cache also brings a 4-D mask
        self.contract.check_call(args, kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("pruning a prefill that continues a non-empty KV cache is not supported")
        embeds = kwargs["inputs_embeds"]
        bsz, length = embeds.shape[:2]
        am = kwargs.get("attention_mask")
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
        self.bound = DecodeBinding(cache=cache, lm_len=length, fed_len=length)
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
        if self.pruner.stage == "vision":
            keep, kept = self._vision_keep(image_id, call.spans, vis)
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
        self.bound.fed_len = new.valid.shape[1]
        self.bound.lm_next_pos = self._next_pos(new if reindex else old)
        return args, kwargs

    def _vision_keep(self, image_id: torch.Tensor, spans: Spans, vis: VisionPass) -> tuple[torch.Tensor, list]:
        """LM-input keep mask (text + the slots the reduced visual tokens fill) and kept indices per sample / image."""
        raise NotImplementedError

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
            cache = self.contract.cache_out(output)
            if self.bound is not None:
                check_cache_after_prefill(self.contract, cache, self.bound.fed_len)
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
        if not call.per_layer:  # first decoder layer of this prefill
            check_layer_call(module, self.text_config._attn_implementation, kwargs)
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
            removed = [n - x.shape[-1] for n, x in zip(call.image_counts, sel, strict=False)]
            if not any(removed):
                continue
            made = [self.pruner.recycled_count(m) if hasattr(self.pruner, "recycled_count") else 0 for m in removed]
            row_of = [b for b, row in enumerate(call.spans) for _ in row]
            for j, (m, c) in enumerate(zip(removed, made, strict=False)):
                call.row_tokens[row_of[j]] += c - m
            call.image_counts = [x.shape[-1] + c for x, c in zip(sel, made, strict=False)]
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

    def _select_stage(self, call: PrefillState, lay: _Layout, stage_index: int) -> tuple:
        """(keep mask, kept indices per image, last kept flat index per image) of one LLM-stage drop: one Triton
        launch on CUDA (ties to the earlier token), else the per-image ``pruner.select`` on eager ops."""
        scores = call.scores[stage_index]
        if kernels.runs("tokenprune.select", lambda: kernels.select_why_not(scores)):
            ks = [self.pruner.stage_keep(stage_index, n, n0)
                  for n, n0 in zip(call.image_counts, call.image_lengths, strict=True)]
            keep, sel, last = kernels.topk_per_image(scores, lay.image, lay.valid, ks, [len(row) for row in call.spans])
            return keep, (list(sel) if len(set(ks)) == 1 else [sel[j, :k] for j, k in enumerate(ks)]), last
        flat = scores.flatten()
        return _select_per_image(lay.image, lay.valid, call.image_counts, call.image_lengths,
                                 lambda g, x: self.pruner.select(stage_index, flat[x], call.image_lengths[g]))

    def _score_rows(self, call: PrefillState, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
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
    def _report(self, call: PrefillState) -> PruneReport:
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
