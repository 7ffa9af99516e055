"""timm model families over visattn attention; importing this registers them with timm."""

from visattn.models import nat

__all__ = ["nat"]
