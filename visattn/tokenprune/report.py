"""Per-call pruning report: tokens kept per sample, layer-averaged counts, estimated LLM prefill FLOPs saved."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def layer_flops(n: int, hidden: int, q_dim: int, kv_dim: int, inter: int, attn_n: int | None = None) -> float:
    """Forward FLOPs of one Llama-style decoder layer on ``n`` tokens (projections, gated MLP, causal attention);
    ``attn_n``: the attention's sequence length when it differs (DyMU's virtual unmerging attends at full length)."""
    proj = 2 * n * hidden * (2 * q_dim + 2 * kv_dim)
    mlp = 2 * n * 3 * hidden * inter
    a = n if attn_n is None else attn_n
    attn = 2 * a * a * q_dim  # causal: QK^T and AV over half the square each
    return float(proj + mlp + attn)


@dataclass
class PruneReport:
    """What one pruned forward did, per sample of the batch.

    * ``visual_tokens``: visual tokens before pruning (all images of the sample);
    * ``visual_tokens_kept``: visual tokens the LLM holds after the last pruning step (= in its KV cache at the
      last layer), i.e. the budget as "tokens fed to the LLM";
    * ``visual_tokens_layer_avg``: visual tokens averaged over LLM layers (the budget as some papers count it);
    * ``flops_saved``: 1 - estimated LLM prefill FLOPs with pruning / without;
    * ``kept_indices``: per sample, per image, indices (within the image's visual tokens) that were kept;
    * ``extra``: method-specific fields; ZipVL ``kv="quantize"`` adds ``kv_important`` (per sample, per image, the
      indices whose KV cache is stored at the high bit-width), ``kv_bytes`` (per sample, bytes the mixed-precision
      cache holds for the prefill over all layers) and ``kv_bytes_fp16`` (the same tokens' keys and values in
      float16).
    """

    method: str
    visual_tokens: list[int]
    visual_tokens_kept: list[int]
    visual_tokens_layer_avg: list[float]
    flops_saved: list[float]
    kept_indices: list[list[torch.Tensor]]
    extra: dict = field(default_factory=dict)
    _scoring_events: list = field(default_factory=list, repr=False)

    @property
    def scoring_ms(self) -> float:
        """Time spent scoring and selecting (CUDA events or wall clock; synchronises)."""
        total = 0.0
        for start, end in self._scoring_events:
            if isinstance(start, float):
                total += (end - start) * 1e3
            else:
                end.synchronize()
                total += start.elapsed_time(end)
        return total

    def summary(self) -> dict:
        """The per-sample counts as plain lists (plus the KV-cache bytes, stored and float16, when the method
        compressed the cache: ZipVL ``kv="quantize"``)."""
        out = {
            "method": self.method,
            "visual_tokens": self.visual_tokens,
            "visual_tokens_kept": self.visual_tokens_kept,
            "visual_tokens_layer_avg": [round(v, 2) for v in self.visual_tokens_layer_avg],
            "flops_saved": [round(v, 4) for v in self.flops_saved],
        }
        for key in ("kv_bytes", "kv_bytes_fp16"):
            if key in self.extra:
                out[key] = self.extra[key]
        return out


def estimate(
    tokens_per_layer: list[list[int]], text_config, method: str, visual: list[int], visual_per_layer: list[list[int]],
    full_attention: bool = False,
) -> tuple[list[float], list[float]]:
    """(layer-averaged visual tokens, FLOPs saved) per sample from per-layer token counts; ``full_attention``: the
    attention runs over the unpruned length in every layer (DyMU's virtual unmerging), only the projections and
    MLPs over the kept tokens."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    inter = text_config.intermediate_size
    avg, saved = [], []
    for b, per_layer in enumerate(tokens_per_layer):
        full_n = per_layer[0] + (visual[b] - visual_per_layer[b][0])
        attn_n = full_n if full_attention else None
        pruned = sum(layer_flops(n, hidden, heads * head_dim, kv * head_dim, inter, attn_n) for n in per_layer)
        full = len(per_layer) * layer_flops(full_n, hidden, heads * head_dim, kv * head_dim, inter)
        saved.append(1.0 - pruned / full if full else 0.0)
        avg.append(sum(visual_per_layer[b]) / len(visual_per_layer[b]))
    return avg, saved
