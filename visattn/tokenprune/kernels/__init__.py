"""Fused Triton kernels of the token-pruning methods, behind a guarded import.

* ``rowscore``: attention of a few query rows of a decoder layer, averaged over heads and rows (FastV, PyramidDrop,
  SparseVLM scoring);
* ``select``: per-image top-k of an LLM-stage drop, with the keep mask and the kept indices;
* ``recycle``: SparseVLM v1.5 token recycling (pick, DPC-KNN clustering, cluster means);
* ``maxmin``: DivPrune's greedy max-min diversity selection;
* ``dpp``: CDPruner's greedy DPP MAP (incremental Cholesky), all ``k`` steps in one launch;
* ``dedup``: VisPruner's iterative similarity-based removal, all steps in one launch.

Each kernel has one ``*_why_not`` predicate (None when it can run the call, else a short reason) that feeds
``visattn.backends.choose`` (family ``"tokenprune"``: ``"auto"`` takes the kernel where it can run, else the eager
ops; ``"reference"`` always runs the eager ops; ``"triton"`` runs the kernel or raises why not) and, through a
device-level probe registered with ``visattn.backends.register_kernel``, ``visattn info``. Without an importable
triton (macOS, Windows, a broken install) every predicate says so and every method runs its eager path; the
kernel modules themselves are imported only once a predicate has said yes. Kernels never import transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from visattn import backends

FAMILY = "tokenprune"
MAX_SCORE_ROWS = 128  # query rows one row-score program holds in registers
MAX_TOKENS = 16384  # tokens of one row (top-k, recycling) or one image (max-min) held in registers
MAX_PICKED = 256  # recycled-token picks per image (tested up to this): the DPC tiles live in registers

try:
    import triton  # noqa: F401

    TRITON_ERROR: str | None = None
except Exception as _err:  # missing or broken: every why_not reports it, nothing raises
    TRITON_ERROR = f"triton not importable ({type(_err).__name__}: {_err})"


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_why_not(t: torch.Tensor) -> str | None:
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if not (t.is_cuda or interpreting()):
        return "not a CUDA tensor (and TRITON_INTERPRET is not set)"
    return None


def rowscore_why_not(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> str | None:
    """Whether :func:`row_scores` can run: ``q`` (B, R, H, D), ``k`` (B, S, Hkv, D), ``cos`` (B or 1, S, D)."""
    reason = _device_why_not(q)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}: needs matching float16/bfloat16/float32"
    if cos.dim() != 3:
        return f"rotary tables of shape {tuple(cos.shape)}: needs (batch or 1, tokens, head_dim)"
    if q.shape[-1] % 2 or q.shape[-1] > 256 or cos.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} with rotary dim {cos.shape[-1]}: needs an even head_dim <= 256, full RoPE"
    if q.shape[1] > MAX_SCORE_ROWS:
        return f"{q.shape[1]} query rows > {MAX_SCORE_ROWS}"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads"
    return None


def select_why_not(scores: torch.Tensor) -> str | None:
    """Whether :func:`topk_per_image` can run on ``scores`` (B, L)."""
    reason = _device_why_not(scores)
    if reason is None and scores.shape[1] > MAX_TOKENS:
        reason = f"{scores.shape[1]} tokens per row > {MAX_TOKENS}"
    return reason


def recycle_why_not(hidden: torch.Tensor, picked: list[int]) -> str | None:
    """Whether :func:`recycle_tokens` can run on ``hidden`` (B, L, C) with ``picked`` picks per image."""
    reason = _device_why_not(hidden)
    if reason is None and hidden.shape[1] > MAX_TOKENS:
        reason = f"{hidden.shape[1]} tokens per row > {MAX_TOKENS}"
    if reason is None and max(picked, default=0) > MAX_PICKED:
        reason = f"{max(picked)} picked tokens per image > {MAX_PICKED}"
    return reason


def maxmin_why_not(dist: torch.Tensor) -> str | None:
    """Whether :func:`maxmin_picks` can run on the distances ``dist`` (G, N, N)."""
    reason = _device_why_not(dist)
    if reason is None and dist.shape[-1] > MAX_TOKENS:
        reason = f"{dist.shape[-1]} tokens per image > {MAX_TOKENS}"
    return reason


def _float32_matrices_why_not(matrices: torch.Tensor) -> str | None:
    reason = _device_why_not(matrices)
    if reason is None and matrices.dtype != torch.float32:
        reason = f"dtype {matrices.dtype}: needs float32"
    if reason is None and matrices.shape[-1] > MAX_TOKENS:
        reason = f"{matrices.shape[-1]} tokens per image > {MAX_TOKENS}"
    return reason


def dpp_why_not(kernel: torch.Tensor) -> str | None:
    """Whether :func:`dpp_picks` can run on the DPP kernels ``kernel`` (G, N, N)."""
    return _float32_matrices_why_not(kernel)


def dedup_why_not(sim: torch.Tensor) -> str | None:
    """Whether :func:`dedup_positions` can run on the similarity matrices ``sim`` (G, R, R)."""
    return _float32_matrices_why_not(sim)


def runs(kernel: str, why_not: Callable[[], str | None]) -> bool:
    """Whether the fused ``kernel`` serves this call under the tokenprune backend (``visattn.backends``)."""
    return backends.choose(kernel, None, why_not, family=FAMILY) == "triton"


# The launchers import their kernel module on first use, after a predicate said yes (triton importable).
def row_scores(*args, **kwargs) -> torch.Tensor:
    """See :func:`visattn.tokenprune.kernels.rowscore.row_scores`."""
    from visattn.tokenprune.kernels.rowscore import row_scores as launch

    return launch(*args, **kwargs)


def topk_per_image(*args, **kwargs):
    """See :func:`visattn.tokenprune.kernels.select.topk_per_image`."""
    from visattn.tokenprune.kernels.select import topk_per_image as launch

    return launch(*args, **kwargs)


def recycle_tokens(*args, **kwargs) -> torch.Tensor:
    """See :func:`visattn.tokenprune.kernels.recycle.recycle_tokens`."""
    from visattn.tokenprune.kernels.recycle import recycle_tokens as launch

    return launch(*args, **kwargs)


def maxmin_picks(*args, **kwargs) -> torch.Tensor:
    """See :func:`visattn.tokenprune.kernels.maxmin.maxmin_picks`."""
    from visattn.tokenprune.kernels.maxmin import maxmin_picks as launch

    return launch(*args, **kwargs)


def dpp_picks(*args, **kwargs) -> torch.Tensor:
    """See :func:`visattn.tokenprune.kernels.dpp.dpp_picks`."""
    from visattn.tokenprune.kernels.dpp import dpp_picks as launch

    return launch(*args, **kwargs)


def dedup_positions(*args, **kwargs) -> torch.Tensor:
    """See :func:`visattn.tokenprune.kernels.dedup.dedup_positions`."""
    from visattn.tokenprune.kernels.dedup import dedup_positions as launch

    return launch(*args, **kwargs)


def _probe(device: str) -> str | None:
    """Device-level capability for ``visattn info`` (shapes are checked per call by the predicates above)."""
    try:
        return _device_why_not(torch.empty(0, device=device))
    except Exception as err:  # an unusable device string: a reason, never an exception
        return f"device {device!r} unusable ({type(err).__name__}: {err})"


for _name, _text in (("rowscore", "LLM-stage row scores: RoPE + row softmax + head/row mean (FastV, PDrop, SparseVLM)"),
                     ("select", "per-image top-k of an LLM-stage drop, keep mask and kept indices"),
                     ("recycle", "SparseVLM v1.5 token recycling (pick, DPC-KNN, cluster means)"),
                     ("maxmin", "DivPrune greedy max-min diversity selection"),
                     ("dpp", "CDPruner greedy DPP MAP (incremental Cholesky), one launch"),
                     ("dedup", "VisPruner iterative similarity-based removal, one launch")):
    backends.register_kernel(f"{FAMILY}.{_name}", FAMILY, _probe, _text)

__all__ = ["FAMILY", "MAX_PICKED", "MAX_SCORE_ROWS", "MAX_TOKENS", "TRITON_ERROR", "dedup_positions",
           "dedup_why_not", "dpp_picks", "dpp_why_not", "interpreting", "maxmin_picks", "maxmin_why_not",
           "recycle_tokens", "recycle_why_not", "row_scores", "rowscore_why_not", "runs", "select_why_not",
           "topk_per_image"]
