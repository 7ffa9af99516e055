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
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration as cls

        cfg = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=[[image_size, image_size * 2], [image_size * 2, image_size]],
        )
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration as cls

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
