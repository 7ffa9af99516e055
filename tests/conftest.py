"""Shared pytest setup: the ``gpu`` marker auto-skip, and Inductor's cache private to the session (set on import
of ``interpreted``). Keep this file minimal."""

import interpreted  # noqa: F401  (sets TORCHINDUCTOR_CACHE_DIR before any test compiles)
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

