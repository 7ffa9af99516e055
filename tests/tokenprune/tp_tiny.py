"""Tiny randomly initialised HF LLaVA models and helpers shared by the tokenprune tests."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 3
PAD = 0


def tiny_llava(attn: str = "sdpa", seed: int = 0, layers: int = 4, image_size: int = 56, next_: bool = False):
    from transformers import CLIPVisionConfig, LlamaConfig

    torch.manual_seed(seed)
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=512, pad_token_id=PAD,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=14,
    )
    if next_:
        from transformers import LlavaNextConfig
        from transformers import LlavaNextForConditionalGeneration as cls

        cfg = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=[[image_size, image_size * 2], [image_size * 2, image_size]],
        )
    else:
        from transformers import LlavaConfig
        from transformers import LlavaForConditionalGeneration as cls

        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    cfg._attn_implementation = attn
    model = cls._from_config(cfg, attn_implementation=attn) if hasattr(cls, "_from_config") else cls(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval()


def as_eager(model):
    """A copy of ``model`` with eager attention everywhere (the oracle)."""
    import copy

    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


def prompt(prefix: int, n_image: int, suffix: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: (torch.randint(10, 90, (n,), generator=g)).tolist()  # noqa: E731
    return rand(prefix) + [IMAGE_TOKEN] * n_image + rand(suffix)


def batch(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(n - len(p), n) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids, mask


def pixels(n: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 4, 6, 7


def tiny_qwen2vl(attn: str = "sdpa", seed: int = 0, layers: int = 4, v25: bool = False, depth: int = 2):
    """Tiny random Qwen2-VL (or Qwen2.5-VL) with 4-px patches, 2x2 merge and M-RoPE sections (2, 3, 3); ``depth``
    vision blocks (Qwen2.5-VL: block 1 full attention, the others windows of 2x2 merged tokens)."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                bos_token_id=1, eos_token_id=2, num_key_value_heads=2, vocab_size=96, max_position_embeddings=512,
                pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=depth, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if v25:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1],
                      window_size=16)
        cfg_cls, cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        cfg_cls, cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=5,
                  vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND, bos_token_id=1, eos_token_id=2)
    return _random_generator(cls, cfg, attn)


def _random_generator(cls, cfg, attn: str):
    """``cls`` built from ``cfg`` with weights drawn from N(0, 0.2), no end-of-sequence token (generate runs its
    full length) and PAD as padding, in eval mode."""
    model = cls._from_config(cfg, attn_implementation=attn)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


def qwen_prompt(prefix: int, n_image: int, suffix: int, seed: int) -> list[int]:
    """Text, <vision_start>, ``n_image`` image tokens, <vision_end>, text."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: (torch.randint(10, 90, (n,), generator=g)).tolist()  # noqa: E731
    return rand(prefix) + [QWEN_VSTART] + [QWEN_IMAGE] * n_image + [QWEN_VEND] + rand(suffix)


def qwen_pixels(grids: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    """Flattened patches (sum t*h*w, 3*2*4*4) for ``image_grid_thw`` rows ``grids``."""
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(seed))


OV_IMAGE, OV_VIDEO = 3, 5


def tiny_onevision(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    """Tiny random LLaVA-OneVision: SigLIP tower on 24-px crops of 4-px patches (6×6 patches; video frames pool
    to 3×3 = 9 tokens), anyres pinpoints 24×48 / 48×24, a Qwen2 language model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    text = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=24, patch_size=4)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=OV_IMAGE,
                               video_token_id=OV_VIDEO, image_grid_pinpoints=[[24, 48], [48, 24]])
    return _random_generator(LlavaOnevisionForConditionalGeneration, cfg, attn)


def pruned_forward(model, pruner, **inputs):
    """(logits, report) of one no-grad forward of ``model`` with ``pruner`` applied (removed again afterwards)."""
    from visattn import tokenprune as tp

    tp.apply(model, pruner)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, tp.last_report(model)
    finally:
        tp.remove(model)
