"""nn.Modules over visattn's functional API, heads-last so a fused qkv Linear needs no permute.

``NeighborhoodAttention1D/2D/3D`` follow NATTEN 0.21's modules; ``WindowAttention``, ``AgentAttention`` and
``BiLevelRoutingAttention`` follow the official Swin, Agent-Attention and BiFormer modules' argument names;
``SlidingTileAttention``, ``RadialAttention`` and ``VMoBAAttention`` (video) hold NeighborhoodAttention3D's
parameters (``qkv``, ``proj``). The Agent-Swin / Agent-PVT / Agent-DeiT model families configure ``AgentAttention``
and ``WindowAttention`` through keyword-only options rather than keeping attention modules of their own.
"""

from visattn.nn.agent import AgentAttention
from visattn.nn.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention1d,
    NeighborhoodAttention2D,
    NeighborhoodAttention2d,
    NeighborhoodAttention3D,
    NeighborhoodAttention3d,
)
from visattn.nn.positional import swin_rpb_to_visattn, visattn_rpb_to_swin
from visattn.nn.routing import BiLevelRoutingAttention
from visattn.nn.video import RadialAttention, SlidingTileAttention, VMoBAAttention
from visattn.nn.window import WindowAttention

__all__ = [
    "AgentAttention",
    "BiLevelRoutingAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3D",
    "NeighborhoodAttention3d",
    "RadialAttention",
    "SlidingTileAttention",
    "VMoBAAttention",
    "WindowAttention",
    "swin_rpb_to_visattn",
    "visattn_rpb_to_swin",
]
