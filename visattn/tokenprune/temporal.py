"""``temporal-merge``: temporal redundancy merging for video LLM inputs (FastVID / HoliTom style), optionally
followed by per-frame pruning with any embedding-stage method.

The rule, on one video's projected visual tokens ``x`` (F frames x P tokens x D, raster order within a frame):

1. **Segments.** ``m_f`` = mean of frame ``f``'s tokens. Frame ``f > 0`` starts a new segment when
   ``cos(m_f, m_{f-1}) < segment_threshold``; otherwise it continues the segment of frame ``f - 1``.
2. **Static runs.** Per spatial position ``p``, inside a segment: frame ``f``'s token at ``p`` joins the run of
   frame ``f - 1``'s token at ``p`` when ``cos(x[f, p], x[f-1, p]) > threshold`` (adjacent frames, the raw
   embeddings); otherwise it starts a new run. A segment's first frame always starts a run.
3. **Merge.** Each run becomes one token: its first frame's token, with the embedding replaced by the mean of the
   run's embeddings (and that token's position ids: its first occurrence). The others are removed.
4. **Per-frame pruning** (``frames``, optional): each frame's remaining tokens go to ``frames.select`` on their
   own, so the frame keeps ``resolve_budget(frames.keep, remaining)`` of them (merged embeddings are what it sees).

How it differs from the papers: FastVID (DySeg) cuts where adjacent-frame similarity of global features falls below
a threshold *and* at the ``c - 1`` lowest similarities, then merges by density peaks inside each segment (DTM) and
selects by [CLS] attention (ATS); HoliTom segments by a global dynamic programme maximising redundancy and merges
each segment's temporally similar tokens into their first occurrence, then merges spatially (attention / DPC-KNN)
and inside the LLM. Here only the threshold cut and the merge into the first occurrence are kept; spatial reduction
is whatever image method ``frames`` names.
"""

from __future__ import annotations

import numbers

import torch

from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.registry import register_method


def _check_similarity(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a cosine similarity in [-1, 1]")
    return float(value)


def segments(frame_means: torch.Tensor, segment_threshold: float) -> list[int]:
    """Segment id of every frame (F,) from its mean feature (F, D): a new segment where the adjacent frames'
    cosine similarity is below ``segment_threshold``."""
    if frame_means.shape[0] < 2:
        return [0] * frame_means.shape[0]
    sim = torch.nn.functional.cosine_similarity(frame_means[1:], frame_means[:-1], dim=-1)
    cuts = (sim < segment_threshold).long().tolist()
    out = [0]
    for c in cuts:
        out.append(out[-1] + c)
    return out


@register_method("temporal-merge", "temporal_merge", "temporalmerge")
class TemporalMerge(TokenPruner):
    """Merge tokens static across adjacent frames of a segment into their first occurrence, then (optionally)
    prune every frame with ``frames`` (an embedding-stage method such as DivPrune, Random, Uniform).

    Args:
        threshold: cosine similarity above which a token joins the run of the same position in the previous frame.
        segment_threshold: cosine similarity of adjacent frames' mean tokens below which a new segment starts.
        frames: per-frame pruner (embedding stage, no instruction), or None for the merge alone.
    """

    name = "temporal-merge"
    capabilities = Capabilities(stage="embedding", video_merge=True)

    def __init__(self, threshold: float = 0.9, segment_threshold: float = 0.9, frames: TokenPruner | None = None):
        self.threshold = _check_similarity(threshold, "threshold")
        self.segment_threshold = _check_similarity(segment_threshold, "segment_threshold")
        if frames is not None:
            caps = getattr(frames, "capabilities", None)
            if not isinstance(frames, TokenPruner) or caps.stage != "embedding" or caps.video_merge \
                    or caps.text_condition:
                raise ValueError(f"frames={frames!r}: expected an embedding-stage TokenPruner without an instruction "
                                 "(DivPrune, RandomPrune, Uniform, ...)")
        self.frames = frames

    @classmethod
    def from_keep(cls, keep, frames: str = "divprune", **kwargs) -> TemporalMerge:
        """``create("temporal-merge", keep=k)``: the merge followed by ``frames`` (a registered embedding-stage
        method name, DivPrune by default) keeping ``keep`` tokens per frame."""
        from visattn.tokenprune.registry import create

        return cls(frames=create(frames, keep=keep), **kwargs)

    def merge_video(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames`` (F, P, D) → (kept (F, P) bool, embeddings (F, P, D) with merged runs averaged into their
        first token); the rule is the module docstring's."""
        n_frames, n_pos, _ = frames.shape
        seg = torch.tensor(segments(frames.float().mean(1), self.segment_threshold), device=frames.device)
        same = torch.nn.functional.cosine_similarity(frames[1:].float(), frames[:-1].float(), dim=-1) > self.threshold
        joins = torch.cat([torch.zeros(1, n_pos, dtype=torch.bool, device=frames.device),
                           same & (seg[1:] == seg[:-1])[:, None]])  # (F, P): joins the previous frame's run
        # run id of every token: the frame where its run starts (cummax of the start frames along time)
        start = torch.where(joins, 0, torch.arange(n_frames, device=frames.device)[:, None])
        run = start.cummax(0).values  # (F, P)
        kept = ~joins
        flat = (run * n_pos + torch.arange(n_pos, device=frames.device)).flatten()  # run's first token, flat index
        src = frames.reshape(n_frames * n_pos, -1)
        total = torch.zeros_like(src, dtype=torch.float32).index_add_(0, flat, src.float())
        count = torch.zeros(n_frames * n_pos, device=frames.device).index_add_(0, flat, torch.ones_like(flat,
                                                                                                      dtype=torch.float))
        merged = torch.where(kept.flatten()[:, None], total / count.clamp(min=1)[:, None], src.float())
        merged = merged.to(frames.dtype).view_as(frames)
        if self.frames is not None:
            for f in range(n_frames):
                idx = kept[f].nonzero().flatten()
                if idx.numel() == 0:
                    continue
                sel = self.frames.select(merged[f, idx][None])[0]
                row = torch.zeros(n_pos, dtype=torch.bool, device=frames.device)
                row[idx[sel]] = True
                kept[f] = row
        return kept, merged
