"""Independent brute-force references for the tokenprune tests (eager attention, explicit loops)."""

from __future__ import annotations

import math

import torch


def vision_outputs(eager_model, pixel_values):
    vt = eager_model.model.vision_tower
    return vt(pixel_values, output_attentions=True, output_hidden_states=True)


def topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(scores.topk(k).indices.tolist())


def projected_patches(eager_model, pixel_values) -> torch.Tensor:
    """LLaVA image features (N, P, D): projector(hidden_states[-2][:, 1:])."""
    out = vision_outputs(eager_model, pixel_values)
    return eager_model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])


def divprune_loop(features: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min on cosine distance, written as plain loops."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    n = f.shape[0]
    dist = [[1.0 - float(f[i] @ f[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: nearest[i])]
    while len(picked) < k:
        cand = max((i for i in range(n)), key=lambda i: min(dist[p][i] for p in picked))
        picked.append(cand)
    return sorted(picked)


def visionzip_tokens(eager_model, pixel_values, dominant: int, contextual: int):
    """VisionZip tokens per image (pre-projector), built from eager attentions and explicit key recomputation."""
    out = vision_outputs(eager_model, pixel_values)
    attn = out.attentions[-2]  # (N, H, S, S)
    hidden = out.hidden_states[-2]
    vt = eager_model.model.vision_tower
    layer = getattr(vt, "vision_model", vt).encoder.layers[-2]
    x = layer.layer_norm1(out.hidden_states[-3])
    heads = layer.self_attn.num_heads
    keys = layer.self_attn.k_proj(x).view(x.shape[0], x.shape[1], heads, -1).mean(2)
    results, dominants = [], []
    for i in range(hidden.shape[0]):
        scores = attn[i, :, 0, 1:].sum(0)
        dom = topk_sorted(scores, dominant - 1)
        rest = [p for p in range(hidden.shape[1] - 1) if p not in dom]
        metric = torch.nn.functional.normalize(keys[i, 1:][rest], dim=-1)
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        others = [r for r in range(len(rest)) if r not in targets]
        merged = []
        for t in targets:
            members = [o for o in others if int((metric[o] @ metric[targets].T).argmax()) == targets.index(t)]
            acc = hidden[i, 1 + rest[t]].clone()
            if members:
                acc = acc + torch.stack([hidden[i, 1 + rest[o]] for o in members]).mean(0)
            merged.append(acc)
        tokens = [hidden[i, 0]] + [hidden[i, 1 + d] for d in dom] + merged
        results.append(torch.stack(tokens))
        dominants.append(dom)
    return results, dominants


def llm_reference_logits(
    eager_model,
    embeds: torch.Tensor,
    stages: list[tuple[int, list[int]]],
    reindex: bool,
) -> torch.Tensor:
    """Logits of one unpadded sequence ``embeds`` (1, L, D) run layer by layer with explicit causal masks.

    ``stages``: (layer, indices to keep of the sequence as it stands before that layer); original positions are
    carried along unless ``reindex``.
    """
    lm = eager_model.model.language_model
    h = embeds
    pos = torch.arange(h.shape[1])[None]
    orig_pos = pos.clone()
    for idx, layer in enumerate(lm.layers):
        for layer_at, keep in stages:
            if layer_at == idx:
                keep_t = torch.tensor(keep)
                h = h[:, keep_t]
                orig_pos = orig_pos[:, keep_t]
        pos = torch.arange(h.shape[1])[None] if reindex else orig_pos
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        cos, sin = lm.rotary_emb(h, pos)
        out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    return eager_model.lm_head(lm.norm(h))


def mrope_positions(ids: list[int], image_token: int, grids: list[tuple[int, int, int]],
                    merge: int = 2) -> torch.Tensor:
    """Qwen2-VL M-RoPE position ids (3, L) of one unpadded prompt, by a plain loop over its tokens.

    Text: all three axes = the running position; an image run of merged (t, h/merge, w/merge) tokens starting at
    position ``p``: (p + t_i, p + row, p + col) in raster order; after a run, text resumes at max(ids so far) + 1.
    """
    out, nxt, i, img = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token:
            out.append((nxt, nxt, nxt))
            nxt, i = nxt + 1, i + 1
            continue
        t, h, w = grids[img]
        for ti in range(t):
            for r in range(h // merge):
                for c in range(w // merge):
                    out.append((nxt + ti, nxt + r, nxt + c))
        i += t * (h // merge) * (w // merge)
        img += 1
        nxt = max(max(p) for p in out) + 1
    return torch.tensor(out).T


def mrope_reference_logits(
    eager_model, embeds: torch.Tensor, pos3: torch.Tensor, stages: list[tuple[int, list[int]]], reindex: bool
) -> torch.Tensor:
    """Logits of one unpadded sequence ``embeds`` (1, L, D) with M-RoPE positions ``pos3`` (3, L), layer by layer
    with explicit causal masks; ``stages`` as in :func:`llm_reference_logits` (positions gathered unless
    ``reindex``, then 0..n-1 on all three axes from that layer on)."""
    lm = eager_model.model.language_model
    h, pos, reindexed = embeds, pos3[:, None], False
    for idx, layer in enumerate(lm.layers):
        for layer_at, keep in stages:
            if layer_at == idx:
                keep_t = torch.tensor(keep)
                h, pos, reindexed = h[:, keep_t], pos[:, :, keep_t], reindex
        if reindexed:
            pos = torch.arange(h.shape[1])[None, None].expand(3, 1, -1)
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        cos, sin = lm.rotary_emb(h, pos)
        out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
        h = out[0] if isinstance(out, tuple) else out
    return eager_model.lm_head(lm.norm(h))


def zipvl_rule(acc: list[float], norm: list[float], tau: float) -> list[int]:
    """ZipVL's rule as plain loops: the paper's adaptive count p = min{p : sum of the p largest accumulated
    scores ``acc`` >= tau * their total}, then the p tokens of largest normalised score ``norm`` (earlier token
    first on ties), ascending."""
    total = sum(sorted(acc, reverse=True))
    running, p = 0.0, 0
    for a in sorted(acc, reverse=True):
        running += a
        p += 1
        if running >= tau * total:
            break
    return sorted(sorted(range(len(acc)), key=lambda j: (-norm[j], j))[:p])


def greedy_map_loop(kernel: list[list[float]], k: int) -> list[int]:
    """Fast greedy DPP MAP in plain float64 Python: d2[j] = L[j][j]; pick argmax d2 (first on ties);
    e_j = (L[pick][j] - sum_t c[t][pick] c[t][j]) / sqrt(d2[pick]); d2[j] -= e_j²; O(k·N²) with the dot."""
    n = len(kernel)
    d2 = [kernel[j][j] for j in range(n)]
    rows: list[list[float]] = []
    picked: list[int] = []
    for _ in range(k):
        best = max((j for j in range(n) if j not in picked), key=lambda j: (d2[j], -j))
        picked.append(best)
        root = math.sqrt(d2[best])
        e = [(kernel[best][j] - sum(r[best] * r[j] for r in rows)) / root for j in range(n)]
        rows.append(e)
        d2 = [d2[j] - e[j] ** 2 for j in range(n)]
    return sorted(picked)


def vispruner_removal_loop(feats: torch.Tensor, residual: list[int], target: int) -> list[int]:
    """VisPruner's iterative removal in float64 plain loops: while the residual list is longer than ``target``,
    drop ``r = min(8, len - target, ceil(len / 2))`` of its even-position tokens, those with the largest cosine
    similarity to an odd-position token (stable: ties to the earlier); survivors by descending score, then the
    odd-position tokens. ``feats`` (P, C) features, ``residual`` indices into them; returns the final list."""
    f = torch.nn.functional.normalize(feats.double(), dim=-1)
    while True:
        r = min(8, len(residual) - target, (len(residual) + 1) // 2)
        if r <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]
        best = [max(float(f[x] @ f[y]) for y in b) for x in a]
        ranked = sorted(range(len(a)), key=lambda i: (-best[i], i))
        residual = [a[i] for i in ranked[r:]] + b
