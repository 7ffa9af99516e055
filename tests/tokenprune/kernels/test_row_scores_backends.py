"""LLM-side methods select the same tokens and produce the same logits whether their scores, top-k and recycling
run on the fused Triton kernels or on the eager ops (which the CPU tests check against ``output_attentions``), on
LLaVA and on Qwen2-VL (M-RoPE): on CUDA, and on CPU under TRITON_INTERPRET=1."""

import inspect
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from interpreted import run_interpreted  # noqa: E402
from tp_tiny import QWEN_IMAGE, batch, pixels, prompt, qwen_pixels, qwen_prompt, tiny_llava, tiny_qwen2vl  # noqa: E402

from visattn import backends  # noqa: E402
from visattn import tokenprune as tp  # noqa: E402

METHODS = {
    "fastv": lambda: tp.FastV(layer=2, keep=5),
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
    "sparsevlm": lambda: tp.SparseVLM(layers=[0, 1, 2], counts=[8, 5, 3]),
}


CASES = [("llava", name) for name in METHODS] + [("qwen2-vl", "fastv"), ("qwen2-vl", "pdrop")]
# default run: SparseVLM exercises all three LLM-stage kernels (row scores, top-k, recycling) over three stages;
# the other cases (Qwen2-VL's M-RoPE tables among them) run with -m slow, and all of them on CUDA.
DEFAULT_CASES = [("llava", "sparsevlm")]


def _model_and_inputs(kind: str, device: str):
    """A tiny random model and a left-padded batch with images of the same (LLaVA) or different (Qwen) sizes."""
    if kind == "llava":
        ids, mask = batch([prompt(3, 16, 9, 0), prompt(6, 16, 12, 1), prompt(2, 16, 7, 2)])
        return tiny_llava("sdpa"), dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3, seed=7))
    grids = [(1, 4, 6), (1, 6, 8)]
    ids, mask = batch([qwen_prompt(3, 6, 4, 1), qwen_prompt(5, 12, 2, 2)])
    model = tiny_qwen2vl("sdpa")
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=qwen_pixels(grids, seed=3),
              image_grid_thw=torch.tensor(grids))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
    return model, kw


def compare(kind: str, name: str, device: str) -> dict:
    """Run ``name`` with each backend on a left-padded batch; return what differs."""
    model, inputs = _model_and_inputs(kind, device)
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    results = {}
    for backend in ("triton", "reference"):
        tp.apply(model, METHODS[name]())
        try:
            with backends.use_backend(backend, family="tokenprune"), torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            rep = tp.last_report(model)
            stages = [[[x.tolist() for x in img] for img in st] for st in rep.extra["stage_selected"]]
            results[backend] = (torch.stack(out.logits, 1).cpu(), stages, out.sequences.tolist())
        finally:
            tp.remove(model)
    (lt, st, qt), (le, se, qe) = results["triton"], results["reference"]
    return {"kind": kind, "name": name, "selections_equal": st == se, "sequences_equal": qt == qe, "stages": len(st),
            "logit_err": float((lt - le).abs().max())}


def _check(res: dict) -> None:
    assert res["stages"] == (1 if res["name"] == "fastv" else 3), res
    assert res["selections_equal"] and res["sequences_equal"], res
    assert res["logit_err"] < 1e-4, res


@pytest.mark.gpu
@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_kernel_and_eager_scores_agree_on_cuda(kind, name):
    _check(compare(kind, name, "cuda"))


def run_cases(cases=DEFAULT_CASES) -> list[dict]:
    return [compare(kind, name, "cpu") for kind, name in cases]


@pytest.mark.interpret
def test_kernel_and_eager_scores_agree_interpreted(interpreted_results):
    results = interpreted_results["test_row_scores_backends"]
    assert len(results) == len(DEFAULT_CASES)
    for res in results:
        _check(res)


@pytest.mark.slow
@pytest.mark.interpret
def test_kernel_and_eager_scores_agree_interpreted_all_cases():
    results = run_interpreted(__file__, timeout=900)
    assert len(results) == len(CASES)
    for res in results:
        _check(res)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases(CASES)))
