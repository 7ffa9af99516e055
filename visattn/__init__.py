"""visattn: fast attention for vision and multimodal models.

Heads-last functional API (``[B, *spatial, heads, head_dim]``): ``na1d``/``na2d``/``na3d`` with NATTEN 0.21's
signatures, ``window_attention``, ``agent_attention`` and ``bilevel_routing_attention``; exact reference semantics
(docs/SEMANTICS.md) and Triton kernels behind one dispatcher. Importing visattn registers its timm models.
"""

from visattn.functional import (
    agent_attention,
    bilevel_routing_attention,
    na1d,
    na2d,
    na3d,
    which_backend,
    window_attention,
)

__version__ = "0.1.0"

__all__ = [
    "agent_attention",
    "bilevel_routing_attention",
    "na1d",
    "na2d",
    "na3d",
    "which_backend",
    "window_attention",
    "__version__",
]

import visattn.models  # noqa: E402,F401  (registers the timm model families)
