"""Without an importable triton (macOS, Windows, a broken install) every pruning method runs its eager path.

A child process hides triton before importing visattn (tests/no_triton.py: ``import triton`` fails and
``importlib.util.find_spec("triton")`` answers None, as on a machine without it, and every ``triton.*`` module is
refused), runs every method through ``generate()`` on a tiny LLaVA and returns the logits. The oracle is the same
runs in this process on the eager ops (``backends.use_backend("reference")``), which the other tokenprune tests check
against brute force."""

from __future__ import annotations

import sys

from no_triton import hide_triton  # imports nothing heavy

if __name__ == "__main__":  # the child process: triton is gone before anything imports torch or visattn
    hide_triton()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from interpreted import child_env  # noqa: E402

METHODS = ("fastv", "pdrop", "sparsevlm", "dart", "fastervlm", "vtc-cls", "visionzip", "vispruner", "pooling",
           "divprune", "uniform", "random", "cdpruner", "tome", "zipvl", "dymu")


def _pruner(name: str):
    from visattn import tokenprune as tp

    return {
        "fastv": lambda: tp.FastV(layer=1, keep=5),
        "pdrop": lambda: tp.PyramidDrop(layers=[1, 2], ratios=[0.5, 0.25]),
        "sparsevlm": lambda: tp.SparseVLM(layers=[0, 1], counts=[8, 4]),
        "fastervlm": lambda: tp.FasterVLM(keep=5),
        "vtc-cls": lambda: tp.VTCCLS(keep=5, start_layer=0),
        "visionzip": lambda: tp.VisionZip(dominant=5, contextual=3),
        "divprune": lambda: tp.DivPrune(keep=5),
        "uniform": lambda: tp.Uniform(keep=5),
        "tome": lambda: tp.ToMe(r=4),
        "dart": lambda: tp.DART(layer=1, keep=4, pivot_image=1, pivot_text=1),
        "vispruner": lambda: tp.VisPruner(keep=5),
        "pooling": lambda: tp.Pooling(keep=4),
        "random": lambda: tp.RandomPrune(keep=5, seed=3),
        "cdpruner": lambda: tp.CDPruner(keep=5),
        "zipvl": lambda: tp.ZipVL(tau=0.5, layer=1),
        "dymu": lambda: tp.DyMU([0.99, 0.99]),
    }[name]()


def run_methods() -> dict:
    """Logits (B, L', V) and kept-token counts of every method's pruned forward on a left-padded batch (the
    decode steps run no pruning code that could touch triton)."""
    from tp_tiny import batch, pixels, prompt, tiny_llava

    from visattn import tokenprune as tp

    model = tiny_llava("sdpa", layers=3)
    ids, mask = batch([prompt(3, 16, 4, 1), prompt(6, 16, 2, 2)])
    out = {}
    for name in METHODS:
        tp.apply(model, _pruner(name))
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2, seed=7)).logits
            out[name] = {"logits": logits.tolist(),
                         "kept": tp.last_report(model).visual_tokens_kept}
        finally:
            tp.remove(model)
    return out


def _child_main() -> None:
    from visattn import backends
    from visattn import tokenprune as tp
    from visattn.tokenprune import kernels

    result = {"triton_error": kernels.TRITON_ERROR, "results": run_methods()}
    with backends.use_backend("triton", family="tokenprune"):  # a forced backend says why it cannot run
        from tp_tiny import batch, pixels, prompt, tiny_llava

        model = tiny_llava("sdpa", layers=3)
        ids, mask = batch([prompt(3, 16, 4, 1)])
        tp.apply(model, tp.FastV(layer=1, keep=5))
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1, seed=7))
            result["forced"] = None
        except ValueError as err:
            result["forced"] = str(err)
    result["triton_modules"] = sorted(m for m, v in sys.modules.items() if m.startswith("triton") and v is not None)
    print(json.dumps(result))


def test_every_method_runs_its_eager_path_without_triton():
    child_proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                  env=child_env(VISATTN_TOKENPRUNE_BACKEND=""), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    from visattn import backends

    try:
        with backends.use_backend("reference", family="tokenprune"):  # meanwhile, the oracle in this process
            expected = run_methods()
        stdout, stderr = child_proc.communicate(timeout=600)
    finally:
        if child_proc.poll() is None:
            child_proc.kill()
    assert child_proc.returncode == 0, stderr[-3000:]
    child = json.loads(stdout.strip().splitlines()[-1])
    assert child["triton_error"] and "triton not importable" in child["triton_error"]
    assert child["triton_modules"] == []
    forced = child["forced"]
    assert forced is not None and "backend='triton'" in forced and "triton not importable" in forced
    assert sorted(child["results"]) == sorted(METHODS)
    for name in METHODS:
        got, want = child["results"][name], expected[name]
        assert got["kept"] == want["kept"], name
        torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(want["logits"]), atol=1e-5, rtol=1e-5,
                                   msg=name)


if __name__ == "__main__":
    _child_main()
