"""nn.Modules over visattn's functional API, heads-last so a fused qkv Linear needs no permute.

``NeighborhoodAttention1D/2D/3D`` follow NATTEN 0.21's modules; ``WindowAttention``, ``AgentAttention`` and
``BiLevelRoutingAttention`` follow the official Swin, Agent-Attention and BiFormer modules' argument names.
The Agent-Swin / Agent-PVT / Agent-DeiT model families configure ``AgentAttention`` and ``WindowAttention`` through
keyword-only options rather than keeping attention modules of their own.
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
    "WindowAttention",
    "swin_rpb_to_visattn",
    "visattn_rpb_to_swin",
]
