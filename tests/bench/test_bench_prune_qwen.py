"""``visattn bench-prune --qwen-videos``: the Qwen2.5-VL-7B video workload (issue 24).

The 7B architecture is checked against the released Qwen2.5-VL-7B-Instruct config (values transcribed from its
config.json; parameter count from its model page, 8.29B) on the meta device; the tiny run goes through ``main()`` on
the CPU and its counts are checked against the grid arithmetic ((frames / 2) x (side / patch / 2)^2 tokens)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import read_strict_json

pytest.importorskip("transformers")

from visattn.bench import prune  # noqa: E402


def test_qwen_config_is_the_released_7b_architecture():
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = prune.qwen_config(tiny=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    lm, tower = model.model.language_model, model.model.visual
    attn = lm.layers[0].self_attn
    assert len(lm.layers) == 28 and lm.embed_tokens.weight.shape == (152064, 3584)
    assert attn.q_proj.weight.shape == (28 * 128, 3584) and attn.k_proj.weight.shape == (4 * 128, 3584)
    assert lm.layers[0].mlp.gate_proj.weight.shape == (18944, 3584)
    assert model.lm_head.weight.shape == (152064, 3584) and model.lm_head.weight is not lm.embed_tokens.weight
    text = cfg.text_config
    rope = text.rope_parameters
    assert rope["rope_theta"] == 1000000.0 and list(rope["mrope_section"]) == [16, 24, 24]
    assert text.rms_norm_eps == 1e-6
    assert len(tower.blocks) == 32 and tower.blocks[0].mlp.gate_proj.weight.shape == (3420, 1280)
    assert tower.patch_embed.proj.weight.shape == (1280, 3, 2, 14, 14)  # temporal patch 2, patch 14
    assert tower.merger.mlp[-1].weight.shape == (3584, 5120)  # 2x2 merge of 1280 -> 3584
    v = cfg.vision_config
    assert (v.num_heads, v.window_size, list(v.fullatt_block_indexes), v.tokens_per_second) == (16, 112,
                                                                                             [7, 15, 23, 31], 2)
    assert (cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (151656, 151652, 151653)
    assert round(sum(p.numel() for p in model.parameters()) / 1e7) == 829  # "8.29B params"
    t, h, w = prune.qwen_video_grid(v, 32, 448)
    assert (t, h, w) == (16, 32, 32) and t * h * w // 4 == 16 * 256  # 32 frames at 448 px: 4096 video tokens


def test_qwen_video_rows_tiny_end_to_end(tmp_path, monkeypatch):
    """Only the Qwen model is built (no LLaVA row asked for); every video row decodes with generate(), reports the
    kept tokens of each of its grid frames, and the pruned rows keep fewer tokens than the video has; a method the
    Qwen adapter refuses (FasterVLM: no [CLS] token) is skipped with the reason."""
    def no_llava(*args, **kwargs):
        raise AssertionError("the LLaVA model was built although no LLaVA row was asked for")

    monkeypatch.setattr(prune, "build_model", no_llava)
    out = tmp_path / "prune-qwen.json"
    assert prune.main(["--tiny", "--qwen-videos", "1", "--methods", "divprune,temporal-merge,fastervlm",
                       "--batches", "", "--next-batches", "", "--decode-tokens", "2", "--decode-calls", "1",
                       "--out", str(out)]) == 0
    result = read_strict_json(out)
    rows = {r["method"]: r for r in result["configs"]}
    assert set(rows) == {"none", "divprune", "temporal-merge"}
    cfg = prune.qwen_config(tiny=True).vision_config
    frames, side = prune.QWEN_TINY_FRAMES, prune.QWEN_TINY_SIDE
    grid_t, per_frame = frames // 2, (side // cfg.patch_size // 2) ** 2  # 4 grid frames of 16 tokens
    keep = round(4 * per_frame / 16)  # --keeps 4 (tiny default) of a 16-token LLaVA image, scaled to the frame
    for r in rows.values():
        assert r["shape"] == prune.QWEN_SHAPE and r["batch"] == 1
        assert r["decode_mode"] == "generate" and r["new_tokens_per_sample"] == [2]
        assert r["frames"] == frames and r["video_grid_thw"] == [grid_t, side // cfg.patch_size,
                                                                 side // cfg.patch_size]
        assert r["visual_tokens"] == grid_t * per_frame == 64
    for name in ("divprune", "temporal-merge"):
        r = rows[name]
        assert r["keep_per_image"] == keep and r["keep_requested"] == 4
        (video,) = r["frame_kept"]  # one video per sample: one entry per grid frame
        assert len(video) == grid_t and all(0 <= k <= keep for k in video)
        assert sum(video) == r["llm_visual_tokens"] < r["visual_tokens"]
    assert rows["divprune"]["frame_kept"] == [[keep] * grid_t]
    # the two scenes of the synthetic video: each scene's second frame merges into its first
    assert rows["temporal-merge"]["llm_visual_tokens"] < rows["divprune"]["llm_visual_tokens"]
    (skip,) = result["skipped"]
    assert skip["method"] == "fastervlm" and skip["reason"].startswith("not supported")
    assert "Qwen2.5-VL-7B architecture" in prune.markdown(result)


def test_qwen_arguments_are_checked():
    with pytest.raises(ValueError, match="--qwen-frames"):
        prune.main(["--tiny", "--qwen-videos", "1", "--qwen-frames", "7", "--batches", "", "--next-batches", ""])
    with pytest.raises(ValueError, match="--qwen-videos"):
        prune.main(["--tiny", "--qwen-videos", "one", "--batches", "", "--next-batches", ""])
    with pytest.raises(ValueError, match="--batches"):
        prune.main(["--tiny", "--batches", "0"])
    vis = prune.qwen_config(tiny=True).vision_config
    with pytest.raises(ValueError, match="frames="):
        prune.qwen_video_grid(vis, 3, 32)
    with pytest.raises(ValueError, match="side="):
        prune.qwen_video_grid(vis, 4, 30)


def test_qwen_methods_flag_picks_the_video_rows_methods():
    """``--qwen-methods`` sets the Qwen rows' methods apart from the LLaVA rows' ``--methods`` (which the Qwen rows
    follow when it is absent, and the video defaults when neither is given)."""
    import argparse

    parser = argparse.ArgumentParser()
    prune.add_arguments(parser)

    def methods(*argv):
        rows = prune.grid(parser.parse_args(["--tiny", "--qwen-videos", "1", *argv]))
        return ({m for s, _, _, m, _ in rows if s == prune.QWEN_SHAPE},
                {m for s, _, _, m, _ in rows if s != prune.QWEN_SHAPE})

    assert methods("--methods", "cdpruner", "--qwen-methods", "random,temporal-merge") == (
        {"none", "random", "temporal-merge"}, {"none", "cdpruner"})
    assert methods("--methods", "dart")[0] == {"none", "dart"}
    assert methods()[0] == {"none", *prune.QWEN_METHODS}


def test_fast_vision_patches_the_qwen_model_for_every_row(tmp_path, monkeypatch):
    """``--fast-vision``: every Qwen row, the unpruned baseline included, is measured on the patched vision attention
    (checked at each measurement), the header and the rows record it, and pruning keeps what it keeps unpatched."""
    from visattn.tokenprune.hf_qwen_vision_attn import is_vision_attention_patched

    measured, real = [], prune.measure

    def measure(model, inputs, pruner, *args, **kwargs):
        measured.append(all(is_vision_attention_patched(b.attn) for b in model.model.visual.blocks))
        return real(model, inputs, pruner, *args, **kwargs)

    monkeypatch.setattr(prune, "measure", measure)
    out = tmp_path / "prune-fast.json"
    assert prune.main(["--tiny", "--qwen-videos", "1", "--methods", "divprune", "--fast-vision", "--qwen-frames", "4",
                       "--batches", "",
                       "--next-batches", "", "--decode-tokens", "2", "--decode-calls", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert measured == [True, True]
    assert result["fast_vision"] is True and "2 vision attention modules" in result["fast_vision_patch"]
    rows = {r["method"]: r for r in result["configs"]}
    assert set(rows) == {"none", "divprune"} and all(r["fast_vision"] is True for r in rows.values())
    keep = round(4 * 16 / 16)
    assert rows["divprune"]["frame_kept"] == [[keep] * 2]  # 4 input frames = 2 grid frames
    assert "`--fast-vision`" in prune.markdown(result)
