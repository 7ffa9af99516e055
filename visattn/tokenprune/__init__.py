"""Visual token pruning for multimodal models: scorers x selectors x adapters, on unmodified models.

>>> from visattn import tokenprune
>>> model = tokenprune.apply(model, tokenprune.FastV(layer=2, keep=64))
>>> out = model.generate(**inputs)
>>> tokenprune.last_report(model).visual_tokens_kept
>>> tokenprune.remove(model)

See docs/TOKENPRUNE.md for budget semantics and the position policy of every method.
"""

from visattn.tokenprune.api import REGISTRY, apply, available, create, last_report, register, remove
from visattn.tokenprune.methods import (
    VTCCLS,
    DivPrune,
    FasterVLM,
    FastV,
    LLMPruner,
    PyramidDrop,
    TokenPruner,
    Uniform,
    VisionPruner,
    VisionZip,
)
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.report import PruneReport
from visattn.tokenprune.sparsevlm import SparseVLM
from visattn.tokenprune.tome import ToMe

__all__ = [
    "REGISTRY",
    "VTCCLS",
    "DivPrune",
    "FastV",
    "FasterVLM",
    "LLMPruner",
    "PruneReport",
    "PyramidDrop",
    "SparseVLM",
    "ToMe",
    "TokenPruner",
    "Uniform",
    "VisionPruner",
    "VisionZip",
    "apply",
    "available",
    "create",
    "last_report",
    "register",
    "register_method",
    "remove",
]
