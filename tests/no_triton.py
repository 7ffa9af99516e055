"""Make triton unimportable in this process, as on a machine without it (macOS, Windows, a broken install).

Call :func:`hide_triton` in a child process before anything imports torch or visattn. It drops any loaded
``triton*`` module, puts ``None`` in ``sys.modules["triton"]`` and ``sys.modules["triton.language"]`` (so
``import triton`` raises ``ModuleNotFoundError`` and ``importlib.util.find_spec("triton")`` answers None, as for a
missing package: torch's optional-import probes expect both), and installs a ``sys.meta_path`` finder that refuses
every other ``triton.*`` module the same way. Imports nothing heavy itself.
"""

from __future__ import annotations

import sys


class _HideTriton:
    """A meta-path finder that refuses ``triton`` and its submodules with ``ModuleNotFoundError``."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


def hide_triton() -> None:
    """Make ``triton`` and every ``triton.*`` module unimportable from now on in this process."""
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[name]
    for name in ("triton", "triton.language"):
        sys.modules[name] = None
    sys.meta_path.insert(0, _HideTriton())


__all__ = ["hide_triton"]
