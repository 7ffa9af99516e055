"""timm model families over visattn attention; importing this registers them with timm. ``patch_timm`` runs timm's
own Swin and MaxViT models on visattn's ops in place."""

from visattn.models import agent, agent_deit, agent_pvt, biformer, medvit, nat
from visattn.models.timm_patch import PatchReport, patch_timm, unpatch_timm

__all__ = ["PatchReport", "agent", "agent_deit", "agent_pvt", "biformer", "medvit", "nat", "patch_timm", "unpatch_timm"]
