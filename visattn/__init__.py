"""visattn: fast attention for vision and multimodal models.

Heads-last functional API (``[B, *spatial, heads, head_dim]``), exact reference semantics (docs/SEMANTICS.md)
and Triton kernels behind one dispatcher.
"""

from visattn.functional import (
    agent_attention,
    bilevel_routing_attention,
    na1d,
    na2d,
    na3d,
    window_attention,
)

__version__ = "0.1.0"

__all__ = [
    "agent_attention",
    "bilevel_routing_attention",
    "na1d",
    "na2d",
    "na3d",
    "window_attention",
    "__version__",
]

import visattn.models  # noqa: E402,F401  (registers the timm model families)
