"""timm model families over visattn attention; importing this registers them with timm."""

from visattn.models import agent, biformer, nat

__all__ = ["agent", "biformer", "nat"]
