"""LLM stage of the HF adapters: methods that score and drop visual tokens inside the language model (FastV,
PyramidDrop, SparseVLM, DART, ZipVL, any ``capabilities.stage == "llm"`` method).

Decoder-layer pre-hooks score the visual tokens at each stage's ``score_layer`` (exact attention rows of the last
token, or of the text raters when ``capabilities.text_raters``) and drop them before the stage's ``layer``,
substituting the layer's hidden states, mask, rotary embeddings and position ids for the layers after the drop; with
``capabilities.hidden_select`` the method scores (``layer_scores``) and selects per image (``select_image``, or
all images at once with ``select_images``) by itself; with ``capabilities.recycles`` the deleted tokens are
recycled into extra tokens after each image's kept ones.
Decode steps get each layer's own mask and positions. Combined with a family class by the family modules.
"""

from __future__ import annotations

import torch

from visattn.tokenprune import kernels
from visattn.tokenprune.bookkeeping import kept_now, layout_index, moved_rows, per_sample, rater_candidates, rater_rows
from visattn.tokenprune.hf_base import HFVisionLanguageAdapter, _hidden_arg
from visattn.tokenprune.hf_contract import check_decoder_layers, check_layer_call
from visattn.tokenprune.layout import TokenLayout as _Layout
from visattn.tokenprune.layout import attention_mask_4d, compact
from visattn.tokenprune.layout import select_per_image as _select_per_image
from visattn.tokenprune.recycle import append_recycled
from visattn.tokenprune.scoring import decoder_row_scores
from visattn.tokenprune.state import PrefillState


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor, name: str = "hidden_states"):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs[name] = hidden
    return args, kwargs


def _last_columns(call: PrefillState, length: int) -> list[int]:
    """Every row's last valid column in a layout of ``length`` (host: right padding ends at the row's length)."""
    return [n - 1 for n in call.row_tokens] if call.right_padded else [length - 1] * len(call.row_tokens)


class LLMStage(HFVisionLanguageAdapter):
    """Stage piece for ``capabilities.stage == "llm"`` (see the module docstring)."""

    def _validate(self) -> None:
        super()._validate()
        check_decoder_layers(self.lm, self.layers)
        p = self.pruner
        if self.capabilities.hidden_select and not isinstance(getattr(self.lm, "norm", None), torch.nn.Module):
            raise ValueError(f"model={type(self.model).__name__}: {p.name} selects on the language model's "
                             "final-normed hidden states, but its language model has no `norm` module")
        n_llm = len(self.layers)
        p.bind(n_llm)
        for st in p.stages():
            if st.layer >= n_llm:
                raise ValueError(f"layer={st.layer}: the language model has {n_llm} layers (valid: 1..{n_llm - 1})")

    def _install(self) -> None:
        super()._install()
        for idx, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._make_layer_pre(idx), with_kwargs=True))

    def _prefill(self, call, args, kwargs, image_id, valid):
        embeds = kwargs["inputs_embeds"]
        length = embeds.shape[1]
        stats = torch.cat([valid.sum(1), (~valid[:, -1]).any().long()[None]]).tolist()  # one sync per call
        call.row_tokens, call.right_padded = stats[:-1], bool(stats[-1])
        call.image_counts = list(call.image_lengths)
        if self.capabilities.text_raters:
            with self._timed():
                cands, lo, hi = rater_candidates(call.spans, call.row_tokens, call.right_padded, length)
                call.score_rows, call.score_ok = rater_rows(self.pruner.rater_scores, embeds, image_id, valid,
                                                            cands, lo, hi, _last_columns(call, length))
        return args, kwargs

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

    def _recycled_counts(self, removed: list[int]) -> list[int]:
        """Recycled tokens per image for ``removed`` deleted ones (0 without ``capabilities.recycles``)."""
        if not self.capabilities.recycles:
            return [0] * len(removed)
        return [self.pruner.recycled_count(m) for m in removed]

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
                    if self.capabilities.hidden_select:
                        call.scores[stage_index] = self.pruner.layer_scores(module, hidden, cos, sin, lay.valid)
                    else:
                        rows, row_ok = self._score_rows(call, lay)
                        call.scores[stage_index] = decoder_row_scores(module, hidden, rows, row_ok, cos, sin,
                                                                      lay.valid)
            if st.layer != idx:
                continue
            with self._timed():
                if self.capabilities.hidden_select:
                    keep, sel, last_kept = self._select_hidden(call, lay, stage_index, hidden)
                else:
                    keep, sel, last_kept = self._select_stage(call, lay, stage_index)
            call.stage_selected.append(per_sample(call.spans, list(sel)))
            if self.capabilities.kv_quantize:  # nothing dropped: the selection marks the high-precision cache
                call.kv_important = keep
                continue
            removed = [n - x.shape[-1] for n, x in zip(call.image_counts, sel, strict=False)]
            if not any(removed):
                continue
            made = self._recycled_counts(removed)
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

    def _select_hidden(self, call: PrefillState, lay: _Layout, stage_index: int, hidden: torch.Tensor) -> tuple:
        """``capabilities.hidden_select``: (keep mask, kept indices per image, last kept flat index per image) of
        the method's own selection on the drop layer's input through the language model's final norm: all images
        at once where the method has ``select_images`` (:func:`select_hidden_batched`), else one
        ``select_image`` call per image (:func:`select_hidden_per_image`)."""
        scores, normed = call.scores[stage_index], self.lm.norm(hidden)
        if hasattr(self.pruner, "select_images"):
            return select_hidden_batched(self.pruner, stage_index, scores, normed, lay.image, lay.valid,
                                         call.image_counts)
        return select_hidden_per_image(self.pruner, stage_index, scores, normed, lay.image, lay.valid, call.spans)

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

    def _lm_post(self, module, args, kwargs, output):
        call = self.call
        if call is not None and call.kv_important is not None:
            cache = self.contract.cache_out(output)
            if cache is not None:
                from visattn.tokenprune.hf_kvcache import install_mixed_precision  # imports transformers

                with self._timed():
                    call.kv_bytes = install_mixed_precision(cache, call.kv_important, call.layout.valid,
                                                            self.pruner.kv_bits, self.pruner.kv_group_size)
        return super()._lm_post(module, args, kwargs, output)

    def decode_layers(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per decoder layer (see the base): from the first drop on, the latest stage's kept tokens, and its
        positions when the method reindexes (else the model's own), as :meth:`_layer_decode` substitutes them."""
        out = super().decode_layers()
        for idx in range(len(out)):
            stage = None
            for st in self.bound.stages:
                if st[0] <= idx:
                    stage = st
            if stage is not None:
                out[idx] = (stage[1], stage[2] if self._reindex() else out[idx][1])
        return out

    # ---------------------------------------------------------------------------------------------- report
    def _stage_counts(self, call: PrefillState) -> tuple[list, list, list, dict]:
        lay = call.layout
        bsz = lay.valid.shape[0]
        kept = kept_now(call.spans, lay, call.image_start)
        extra = {"stage_kept": [kept_now(call.spans, x, call.image_start) for x in call.stage_layouts],
                 "stage_selected": call.stage_selected}
        if call.kv_bytes is not None:
            extra["kv_important"] = call.stage_selected[-1]
            extra["kv_bytes"], extra["kv_bytes_fp16"] = call.kv_bytes
        snaps = torch.stack([torch.stack([x.valid.sum(1), ((x.image >= 0) & x.valid).sum(1)])
                             for x in call.layouts]).tolist() if call.layouts else []  # one sync
        tokens = [[snaps[i][0][b] for i in call.per_layer] for b in range(bsz)]
        vis = [[snaps[i][1][b] for i in call.per_layer] for b in range(bsz)]
        return kept, tokens, vis, extra


def select_hidden_per_image(pruner, stage_index: int, scores: torch.Tensor, normed: torch.Tensor,
                            image: torch.Tensor, valid: torch.Tensor, spans) -> tuple:
    """(keep mask (B, L), kept indices per image, last kept flat index per image) from ``pruner.select_image``
    called per image with its tokens' and its sample's instruction tokens' (the text after the sample's first
    image) ``scores`` (B, L, ...) and final-normed hidden states ``normed`` (B, L, C), and their positions in the
    unpadded sequence (host lists); ``image`` / ``valid`` (B, L): the layout, ``spans`` the images of each row.
    One readback of the layout, then the method's own loop per image."""
    length = valid.shape[1]
    keep = (image < 0) & valid
    image_h, valid_h = image.cpu(), valid.cpu()
    cols = torch.arange(length)
    sel, last, j = [], [], 0
    for b, row in enumerate(spans):
        if not row:
            continue
        start = int(valid_h[b].long().argmax())  # the row's first real column (left padding)
        image_cols = [cols[image_h[b] == g] for g in range(j, j + len(row))]
        text_cols = cols[(image_h[b] < 0) & valid_h[b] & (cols > image_cols[0][0])]
        text_dev = text_cols.to(normed.device)
        for own in image_cols:
            own_dev = own.to(normed.device)
            kept = pruner.select_image(stage_index, scores[b, own_dev], normed[b, own_dev], scores[b, text_dev],
                                       normed[b, text_dev], (own - start).tolist(), (text_cols - start).tolist())
            keep[b, own_dev[kept]] = True
            sel.append(kept)
            last.append(b * length + int(own[kept[-1].item()]))
        j += len(row)
    return keep, sel, torch.tensor(last, device=normed.device)


def select_hidden_batched(pruner, stage_index: int, scores: torch.Tensor, normed: torch.Tensor,
                          image: torch.Tensor, valid: torch.Tensor, image_counts: list[int]) -> tuple:
    """:func:`select_hidden_per_image` with the layout work on the device and one ``pruner.select_images`` call
    for all ``G = len(image_counts)`` images (``image_counts``: each image's current token count, host ints;
    ``image`` holds image ids 0..G-1 in batch order). The images' tokens are gathered into (G, N) rows, their
    samples' instruction tokens (valid text after the sample's first image) stay (G, L) rows with a mask; no host
    readback here (the method may make one)."""
    bsz, length = valid.shape
    dev = valid.device
    if not image_counts:
        return (image < 0) & valid, [], torch.zeros(0, dtype=torch.long, device=dev)
    g_n, n_max = len(image_counts), max(image_counts)
    cols = torch.arange(length, device=dev)
    ids = torch.arange(g_n, device=dev)
    is_img = (image >= 0) & valid
    rows = ((image[None] == ids[:, None, None]) & valid[None]).any(2).long().argmax(1)  # (G,) row of each image
    mine = (image.index_select(0, rows) == ids[:, None]) & valid.index_select(0, rows)  # (G, L)
    own = torch.sort((~mine).to(torch.int8), dim=1, stable=True).indices[:, :n_max]  # its columns, in order
    own_ok = torch.arange(n_max, device=dev)[None] < mine.sum(1, keepdim=True)
    start = valid.long().argmax(1)  # each row's first real column (left padding)
    first = torch.where(is_img, cols, length).min(1).values  # each row's first image column
    text = (image < 0) & valid & (cols[None] > first[:, None])
    flat = rows[:, None] * length + own
    kept, counts = pruner.select_images(
        stage_index, scores.flatten(0, 1)[flat], normed.flatten(0, 1)[flat], own_ok, list(image_counts),
        scores.index_select(0, rows), normed.index_select(0, rows), text.index_select(0, rows),
        own - start[rows, None], (cols[None] - start[:, None]).index_select(0, rows))
    kept_cols = own.gather(1, kept)  # (G, K); past an image's count: its last kept column again
    keep = (image < 0) & valid
    keep.view(-1)[(rows[:, None] * length + kept_cols).flatten()] = True
    sel = [kept[g, :c] for g, c in enumerate(counts)]
    return keep, sel, rows * length + kept_cols[:, -1]
