import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def models():
    """The tiny LLaVA-1.5 (sdpa) and its eager twin sharing weights; a test module may define its own ``models``."""
    from tp_tiny import as_eager, tiny_llava

    model = tiny_llava("sdpa")
    return model, as_eager(model)
