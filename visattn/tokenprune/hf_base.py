"""The shared base of the Hugging Face vision-language adapters (forward hooks only, unmodified models).

Adapters are built from two independent pieces:

* the **stage** of the method (``pruner.capabilities.stage``), one subclass of the base each:
  :class:`~visattn.tokenprune.hf_vision.VisionStage` (scores from the vision tower, tokens reduced before the
  projector), :class:`~visattn.tokenprune.hf_embedding.EmbeddingStage` (selection on the projected visual
  tokens) and :class:`~visattn.tokenprune.hf_llm.LLMStage` (scoring and dropping inside decoder-layer
  pre-hooks);
* the **model family**, a subclass of the base that overrides a few methods: how many placeholder tokens one
  image has (``_tokens_per_image``), which token marks a video and how its runs split into frames
  (``_video_token_id``, ``_video_frames``; the base's ``_core_pre`` finds images and frames) and the position ids
  (M-RoPE): :mod:`~visattn.tokenprune.hf_llava`, :mod:`~visattn.tokenprune.hf_llava_next`,
  :mod:`~visattn.tokenprune.hf_qwen2vl`, :mod:`~visattn.tokenprune.hf_llava_onevision` (the last two also split
  videos into frames: ``PrefillState.videos``, reported as ``extra["frame_kept"]``). Each family module combines
  its family class with the stages it supports (``class LlavaLLMAdapter(LLMStage, LlavaAdapter)``) and picks one
  from the method's capabilities.

This base holds what every stage shares: the hooks on the model, the core and the language model, the prefill
state (which tokens are images, their layout), the translation of decode steps on the same KV cache object
(mask, positions), the compaction of the language-model input used by the stages before the LLM, timing and the
report. Every assumption about transformers is checked through :mod:`visattn.tokenprune.hf_contract`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from visattn.tokenprune.bookkeeping import image_starts, last_valid
from visattn.tokenprune.hf_contract import (
    check_cache_after_prefill,
    check_cache_kind,
    check_version,
    language_model_contract,
)
from visattn.tokenprune.layout import TokenLayout as _Layout
from visattn.tokenprune.layout import compact, image_spans, positions_from_valid
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.report import PruneReport, estimate
from visattn.tokenprune.state import DecodeBinding, PrefillState, VisionPass


def _hidden_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[name]


class HFVisionLanguageAdapter:
    """Attach a :class:`TokenPruner` to a HF vision-language model with hooks; :meth:`remove` detaches.

    Not used on its own: a concrete adapter is a stage subclass combined with a family subclass (module
    docstring). Stages implement :meth:`_prefill` (the language model's prefill input) and may extend
    :meth:`_validate`, :meth:`_install` and :meth:`_stage_counts` (the report's per-layer token counts)."""

    def __init__(self, model: torch.nn.Module, pruner: TokenPruner, timing: bool = False):
        self.model = model
        self.pruner = pruner
        self.capabilities = pruner.capabilities
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
        check_version()
        self.contract = language_model_contract(self.lm)
        self._validate()
        self._install()

    # ------------------------------------------------------------------------------------------------ setup
    def _validate(self) -> None:
        """Check the model / method pair before any hook is installed (stages extend this)."""

    def _install(self) -> None:
        """Hooks every stage needs: the model (labels), the core (image tokens), the language model."""
        h = self.handles
        if self.model is not self.core:
            h.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        h.append(self.core.register_forward_pre_hook(self._core_pre, with_kwargs=True))
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True))

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

    # ------------------------------------------------------------------------------------ model and core
    def _model_pre(self, module, args, kwargs):
        """The LM-head wrapper computes a loss from ``labels`` aligned with the unpruned sequence: refuse it."""
        if kwargs.get("labels") is not None and any(kwargs.get(k) is not None for k in self._image_kwargs()):
            raise ValueError("labels: a loss with a pruner attached is not supported (the logits cover the pruned "
                             "sequence, the labels the full one); call tokenprune.remove(model) for training, or "
                             "compute the loss from the returned logits")
        return None

    #: position of ``pixel_values`` in the core model's forward when it comes positionally (LLaVA's: 1); None for
    #: families whose second argument is something else (read by keyword only)
    _PIXEL_VALUES_ARG: int | None = 1

    def _image_kwargs(self) -> tuple[str, ...]:
        video = ("pixel_values_videos",) if self._video_token_id() is not None else ()
        return ("pixel_values", *video, "mm_encoder_outputs")

    def _core_pre(self, module, args, kwargs):
        at = self._PIXEL_VALUES_ARG
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[at] if at is not None and len(args) > at else None)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self.call = None
        video_id = self._video_token_id()
        has_video = video_id is not None and (kwargs.get("pixel_values_videos") is not None
                                              or encoded.get("video") is not None)
        if pixel_values is None and encoded.get("image") is None and not has_video:
            return None
        if input_ids is None:
            raise NotImplementedError("tokenprune needs input_ids (not inputs_embeds) to locate image tokens")
        image_mask = input_ids == self.image_token_id
        spans, videos = image_spans(image_mask, self._tokens_per_image()), []
        if has_video:
            video_mask = input_ids == video_id
            spans, videos = self._video_frames(spans, image_spans(video_mask, None), kwargs)
            image_mask = image_mask | video_mask
        lengths = [e - s for row in spans for s, e in row]
        self.call = PrefillState(image_mask=image_mask, spans=spans, image_lengths=lengths, videos=videos)
        return None

    def _video_token_id(self) -> int | None:
        """The video placeholder token of a family whose videos are pruned frame by frame, else None (no video)."""
        return None

    def _video_frames(self, images: list, videos: list, kwargs: dict) -> tuple[list, list]:
        """Per row, the spans of its images and of every video frame in sequence order (each frame one "image"
        of the prefill), and per video (row, its frames' indices among the row's spans); ``videos`` are the runs
        of video placeholder tokens, ``kwargs`` the core model's call. Families with videos define it."""
        raise NotImplementedError(f"{type(self).__name__} has no video frames")

    def _tokens_per_image(self) -> int | None:
        """Placeholder tokens of one image when fixed (consecutive images then split by it), else None."""
        return None

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
        return self._prefill(call, args, kwargs, image_id, valid)

    def _prefill(self, call: PrefillState, args: tuple, kwargs: dict, image_id: torch.Tensor,
                 valid: torch.Tensor) -> tuple[tuple, dict]:
        """The stage's work on the language model's prefill input (``image_id``: (B, L) image of every token,
        -1 for text; ``valid``: (B, L) real tokens); returns the (possibly replaced) ``args, kwargs``."""
        raise NotImplementedError

    def _drop_lm_input(self, call: PrefillState, args: tuple, kwargs: dict, keep: torch.Tensor,
                       valid: torch.Tensor) -> tuple[tuple, dict]:
        """Remove the language-model input tokens outside ``keep`` (B, L) (the stages before the LLM): embeddings,
        mask, positions and cache positions, and remember the layout for the decode steps."""
        if bool(keep[valid].all()):
            return args, kwargs
        embeds = kwargs["inputs_embeds"]
        am = kwargs.get("attention_mask")
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

    def decode_layers(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """What the decode steps after the last pruned prefill see, per decoder layer: ``(valid, next_pos)``.

        ``valid`` (B, L_l) marks the real tokens of the layer's cached prefill (L_l = that layer's cache length),
        ``next_pos`` (B, 1) is the position of the first generated token; either is None where the adapter leaves
        it to the model (the prompt's own padding mask / ``generate()``'s own positions). This is what
        :meth:`_translate_decode` (and the LLM stage's layer hooks) substitute, for a decode loop that drives the
        decoder layers itself over a static cache (``visattn.bench.graph_decode``). Read it after the prefill."""
        if self.bound is None:
            raise RuntimeError("decode_layers: no pruned prefill to decode from (run the prefill first)")
        entry = (self.bound.lm_valid, self.bound.lm_next_pos)
        return [entry] * len(self.layers)

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

    # ---------------------------------------------------------------------------------------------- report
    def _stage_counts(self, call: PrefillState) -> tuple[list, list, list, dict]:
        """(kept indices per sample / image, valid tokens per sample per LLM layer, visual tokens per sample per
        LLM layer, extra report fields) of a prefill; this default serves the stages before the LLM (the same
        tokens at every layer)."""
        lay = call.layout
        bsz = lay.valid.shape[0]
        kept = call.kept or [[] for _ in range(bsz)]
        n_layers = len(self.layers)
        n_valid = lay.valid.sum(1).tolist()
        n_vis = ((lay.image >= 0) & lay.valid).sum(1).tolist()
        tokens = [[n_valid[b]] * n_layers for b in range(bsz)]
        vis = [[n_vis[b]] * n_layers for b in range(bsz)]
        return kept, tokens, vis, {}

    def _report(self, call: PrefillState) -> PruneReport:
        """Build the report of ``call`` (device readbacks happen here, after the prefill)."""
        visual = [sum(e - s for s, e in row) for row in call.spans]
        kept, tokens, vis, extra = self._stage_counts(call)
        avg, saved = estimate(tokens, self.text_config, self.pruner.name, visual, vis,
                              full_attention=self.capabilities.virtual_unmerge)
        rep = PruneReport(
            method=self.pruner.name,
            visual_tokens=visual,
            visual_tokens_kept=[v[-1] for v in vis],
            visual_tokens_layer_avg=avg,
            flops_saved=saved,
            kept_indices=kept,
            extra=extra,
        )
        if call.videos:  # kept tokens of every frame, per sample, per video
            frame_kept: list[list[list[int]]] = [[] for _ in call.spans]
            for b, frames in call.videos:
                frame_kept[b].append([len(rep.kept_indices[b][j]) for j in frames])
            rep.extra["frame_kept"] = frame_kept
        return rep
