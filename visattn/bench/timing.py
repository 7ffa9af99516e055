"""Kept for existing imports (``visattn.bench.prune``, ``prune_kernels``): the helpers live in ``common``."""

from __future__ import annotations

from visattn.bench.common import device_ceilings, environment, floor_ms, median_ms, save_result

__all__ = ["device_ceilings", "environment", "floor_ms", "median_ms", "save_result"]
