"""The shared backend policy (visattn/backends.py): names, defaults, scoping, and choose/raise semantics."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from visattn import backends


def test_none_means_auto_and_bad_names_are_named():
    assert backends.check_backend_name(None) == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.check_backend_name("cuda")
    with pytest.raises(ValueError, match="family"):
        backends.get_backend("vision")


def test_choose_auto_forced_and_reference():
    can = lambda: None  # noqa: E731
    cannot = lambda: "no GPU here"  # noqa: E731
    assert backends.choose("na", "auto", can, "attention") == "triton"
    assert backends.choose("na", None, cannot, "attention") == "reference"
    assert backends.choose("na", "reference", can, "attention") == "reference"
    with pytest.raises(ValueError, match="cannot run this na call: no GPU here"):
        backends.choose("na", "triton", cannot, "attention")


def test_context_manager_scopes_by_family_and_restores():
    can = lambda: None  # noqa: E731
    with backends.use_backend("reference", family="tokenprune"):
        assert backends.choose("row-score", None, can, "tokenprune") == "reference"
        assert backends.choose("na", None, can, "attention") == "triton"
        with backends.use_backend("triton"):  # a global setting overrides the family's own one
            assert backends.get_backend("tokenprune") == "triton"
        assert backends.get_backend("tokenprune") == "reference"
    assert backends.get_backend("tokenprune") == "auto"
    assert backends.get_backend() == "auto"


def test_environment_variables_are_read_and_checked():
    # load the module alone (not the whole package) so the child starts in well under a second
    code = (
        "import importlib.util as u, sys\n"
        f"spec = u.spec_from_file_location('b', {backends.__file__!r})\n"
        "b = u.module_from_spec(spec)\nsys.modules['b'] = b\nspec.loader.exec_module(b)\n"
        "print(b.get_backend('attention'), b.get_backend('tokenprune'))"
    )
    env = dict(os.environ, VISATTN_BACKEND="reference", VISATTN_TOKENPRUNE_BACKEND="triton")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "triton"]
    env["VISATTN_BACKEND"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "VISATTN_BACKEND='fast'" in bad.stderr


def test_registered_kernels_are_listed_with_reasons():
    backends.register_kernel("test-kernel", "attention", lambda device: None if device == "cuda" else "needs CUDA")
    rows = {entry.name: reason for entry, reason in backends.list_kernels("cpu")}
    assert rows["test-kernel"] == "needs CUDA"
    backends.register_kernel("test-broken", "attention", lambda device: 1 / 0)
    rows = {entry.name: reason for entry, reason in backends.list_kernels("cpu")}
    assert rows["test-broken"].startswith("capability probe failed (ZeroDivisionError")
    backends._KERNELS.pop("test-kernel")
    backends._KERNELS.pop("test-broken")
