"""LLM-side methods select the same tokens and produce the same logits whether their scores come from the fused
Triton row-score kernel or the eager ops (which the CPU tests check against ``output_attentions``): on CUDA, and
on CPU under TRITON_INTERPRET=1."""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from interpreted import run_interpreted  # noqa: E402
from tp_tiny import batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune import scoring  # noqa: E402

METHODS = {
    "fastv": lambda: tp.FastV(layer=2, keep=5),
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
    "sparsevlm": lambda: tp.SparseVLM(layers=[0, 1, 2], counts=[8, 5, 3]),
}


def compare(name: str, device: str) -> dict:
    """Run ``name`` with each backend on a left-padded batch of three; return what differs."""
    model = tiny_llava("sdpa").to(device)
    ids, mask = batch([prompt(3, 16, 9, 0), prompt(6, 16, 12, 1), prompt(2, 16, 7, 2)])
    inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels(3, seed=7).to(device))
    results = {}
    for backend in ("triton", "eager"):
        scoring.LLM_KERNELS = backend
        tp.apply(model, METHODS[name]())
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            rep = tp.last_report(model)
            stages = [[[x.tolist() for x in img] for img in st] for st in rep.extra["stage_selected"]]
            results[backend] = (torch.stack(out.logits, 1).cpu(), stages, out.sequences.tolist())
        finally:
            tp.remove(model)
            scoring.LLM_KERNELS = "auto"
    (lt, st, qt), (le, se, qe) = results["triton"], results["eager"]
    return {"name": name, "selections_equal": st == se, "sequences_equal": qt == qe, "stages": len(st),
            "logit_err": float((lt - le).abs().max())}


def _check(res: dict) -> None:
    assert res["stages"] == (1 if res["name"] == "fastv" else 3) and res["selections_equal"] and res["sequences_equal"], res
    assert res["logit_err"] < 1e-4, res


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(METHODS))
def test_kernel_and_eager_scores_agree_on_cuda(name):
    _check(compare(name, "cuda"))


@pytest.mark.interpret
def test_kernel_and_eager_scores_agree_interpreted():
    for res in run_interpreted(__file__, timeout=600):
        _check(res)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps([compare(name, "cpu") for name in METHODS]))
