"""nn.Modules over visattn's functional API, heads-last so a fused qkv Linear needs no permute."""

from visattn.nn.agent import AgentAttention
from visattn.nn.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from visattn.nn.positional import swin_rpb_to_visattn, visattn_rpb_to_swin
from visattn.nn.routing import BiLevelRoutingAttention
from visattn.nn.window import WindowAttention

__all__ = [
    "AgentAttention",
    "BiLevelRoutingAttention",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3d",
    "WindowAttention",
    "swin_rpb_to_visattn",
    "visattn_rpb_to_swin",
]
