"""timm model families over visattn attention; importing this registers them with timm."""

from visattn.models import agent, agent_deit, agent_pvt, biformer, nat

__all__ = ["agent", "agent_deit", "agent_pvt", "biformer", "nat"]
