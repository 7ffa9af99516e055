"""What ``import visattn`` loads, and the timm families still created by name in either import order.

Each case runs in a fresh interpreter (``sys.modules`` of this pytest process already holds timm and more). The
oracle is the interpreter's own ``sys.modules`` and timm's registry (``timm.is_model``, the class
``timm.create_model`` returns).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Makes the listed top-level packages unimportable, as on an install without them (no extra).
_BLOCK = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, _Missing())
"""


def run_python(code: str, blocked: tuple[str, ...] = (), timeout: float = 240) -> str:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; its stdout, or a failure with
    its stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    prelude = _BLOCK.format(blocked=set(blocked)) if blocked else ""
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_import_visattn_loads_functional_api_without_models_or_integrations():
    out = run_python("""
        import sys
        import torch
        import visattn
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"timm", "open_clip", "transformers", "diffusers"})
        print("heavy", heavy)
        print("models", "visattn.models" in sys.modules, "functional", "visattn.functional" in sys.modules)
        q = torch.randn(1, 8, 8, 1, 4)
        print("na2d", tuple(visattn.na2d(q, q, q, 3).shape))
    """)
    assert "heavy []" in out
    assert "models False functional True" in out
    assert "na2d (1, 8, 8, 1, 4)" in out


@pytest.mark.parametrize("order", ["visattn, then timm", "timm, then visattn"])
def test_models_are_created_by_name_in_either_import_order(order):
    first, second = ("visattn", "timm") if order.startswith("visattn") else ("timm", "visattn")
    out = run_python(f"""
        import sys
        import {first}
        print("timm loaded early", "timm" in sys.modules)
        import {second}
        import timm
        model = timm.create_model("nat_tiny")
        print("class", type(model).__module__, type(model).__name__)
        print("registered", all(timm.is_model(n) for n in ("nat_tiny", "biformer_tiny", "agent_swin_t")))
        print("loader", type(timm.__spec__.loader).__module__, timm.__loader__ is timm.__spec__.loader)
        print("hooks left", [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "visattn"])
    """)
    assert f"timm loaded early {first == 'timm'}" in out
    assert "class visattn.models.nat NAT" in out
    assert "registered True" in out
    assert "loader visattn" not in out and "loader" in out  # timm keeps its real loader
    assert "hooks left []" in out  # the finder removed itself once timm was imported


def test_import_visattn_models_registers_and_submodule_imports_of_timm_fire_the_hook():
    out = run_python("""
        import visattn
        from timm.models import is_model            # a submodule import imports timm first
        print("after timm.models", is_model("dinat_mini"))
    """)
    assert "after timm.models True" in out
    out = run_python("""
        import visattn.models, timm
        print("direct", timm.is_model("agent_pvt_t"))
    """)
    assert "direct True" in out


def test_info_and_smoke_run_without_open_clip_transformers_and_diffusers():
    out = run_python("""
        from visattn import cli
        assert cli.main(["info"]) == 0
        assert cli.main(["smoke", "--device", "cpu", "--no-models"]) == 0
    """, blocked=("open_clip", "transformers", "diffusers"))
    assert "open_clip     not available (ModuleNotFoundError)" in out
    assert " 0 failed" in out


@pytest.mark.slow
def test_smoke_with_models_runs_without_open_clip():
    """The README's ``visattn smoke`` (models included) on an install without the vlm extra."""
    out = run_python("""
        from visattn import cli
        assert cli.main(["smoke", "--device", "cpu"]) == 0
    """, blocked=("open_clip", "transformers", "diffusers"), timeout=600)
    assert "timm nat_mini" in out and "timm swin_tiny (patch_swin)" in out
    assert " 0 failed" in out
