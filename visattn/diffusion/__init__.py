"""Diffusion: diffusers attention processors (LTX-2.5 decoder, FLUX, HunyuanVideo, Wan, AgentSD for UNets),
DiT / HDiT blocks over 2-D and 3-D latents with a selectable attention, and a small DiT model family.

The processors import diffusers lazily (``pip install 'visattn[diffusion]'``); the blocks and models need only torch.
"""

from visattn.diffusion.blocks import (
    AdaRMSNorm,
    AxialRoPE,
    DiTBlock,
    HDiTBlock,
    LatentSelfAttention,
    TokenMerge,
    TokenSplit,
)
from visattn.diffusion.ltx2 import LTX2NeighborhoodAttnProcessor
from visattn.diffusion.models import (
    DiT,
    HDiT,
    create_dit,
    digits_dataset,
    flow_matching_loss,
    list_dits,
    sample_euler,
    training_step,
)
from visattn.diffusion.patching import patch, patch_ltx2, supported_models, unpatch
from visattn.diffusion.processors import (
    AgentSDAttnProcessor,
    FluxNeighborhoodAttnProcessor,
    HunyuanVideoNeighborhoodAttnProcessor,
    LatentGrid,
    WanNeighborhoodAttnProcessor,
    joint_attention,
    joint_neighborhood_attention,
)

__all__ = [
    "AdaRMSNorm",
    "AxialRoPE",
    "DiT",
    "DiTBlock",
    "HDiT",
    "HDiTBlock",
    "LatentSelfAttention",
    "TokenMerge",
    "TokenSplit",
    "create_dit",
    "digits_dataset",
    "flow_matching_loss",
    "list_dits",
    "sample_euler",
    "training_step",
    "AgentSDAttnProcessor",
    "FluxNeighborhoodAttnProcessor",
    "HunyuanVideoNeighborhoodAttnProcessor",
    "LTX2NeighborhoodAttnProcessor",
    "LatentGrid",
    "WanNeighborhoodAttnProcessor",
    "joint_attention",
    "joint_neighborhood_attention",
    "patch",
    "patch_ltx2",
    "supported_models",
    "unpatch",
]
