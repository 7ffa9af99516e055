"""Visual token pruning for multimodal models: scorers x selectors x adapters, on unmodified models.

>>> from visattn import tokenprune
>>> model = tokenprune.apply(model, tokenprune.FastV(layer=2, keep=64))
>>> out = model.generate(**inputs)
>>> tokenprune.last_report(model).visual_tokens_kept
>>> tokenprune.remove(model)

See docs/TOKENPRUNE.md for budget semantics, the position policy of every method and how to write one (a
``TokenPruner`` subclass declaring its ``Capabilities``, registered with ``register_method``).
"""

from visattn.tokenprune.api import (
    REGISTRY,
    apply,
    available,
    create,
    decode_layers,
    last_report,
    register,
    remove,
)
from visattn.tokenprune.baselines import Pooling, RandomPrune
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.cdpruner import CDPruner
from visattn.tokenprune.dart import DART
from visattn.tokenprune.dymu import DyMU, find_thresholds
from visattn.tokenprune.hf_qwen_vision_attn import (
    VisionAttentionReport,
    patch_vision_attention,
    unpatch_vision_attention,
)
from visattn.tokenprune.methods import (
    VTCCLS,
    DivPrune,
    EmbeddingPruner,
    FasterVLM,
    FastV,
    LLMPruner,
    LLMStage,
    PyramidDrop,
    TokenPruner,
    Uniform,
    VisionPruner,
    VisionZip,
)
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.report import PruneReport
from visattn.tokenprune.sparsevlm import SparseVLM
from visattn.tokenprune.temporal import TemporalMerge
from visattn.tokenprune.tome import ToMe
from visattn.tokenprune.vispruner import VisPruner
from visattn.tokenprune.zipvl import ZipVL

__all__ = [
    "DART",
    "REGISTRY",
    "VTCCLS",
    "CDPruner",
    "Capabilities",
    "DivPrune",
    "DyMU",
    "EmbeddingPruner",
    "FastV",
    "FasterVLM",
    "LLMPruner",
    "LLMStage",
    "Pooling",
    "PruneReport",
    "PyramidDrop",
    "RandomPrune",
    "SparseVLM",
    "TemporalMerge",
    "ToMe",
    "TokenPruner",
    "Uniform",
    "VisionPruner",
    "VisPruner",
    "VisionAttentionReport",
    "VisionZip",
    "ZipVL",
    "apply",
    "available",
    "create",
    "decode_layers",
    "find_thresholds",
    "last_report",
    "patch_vision_attention",
    "register",
    "register_method",
    "remove",
    "unpatch_vision_attention",
]
