"""Where the host time of LLM-side pruning goes: wall time (CUDA-synchronised) of each adapter step during one
pruned prefill of the ``bench-prune`` LLaVA-1.5-7B-shaped model. Diagnostic only (the syncs it adds slow the
prefill down); prints a table.

Usage (repo root, CUDA): python benchmarks/profile_prune.py METHOD BATCH [IMAGES], e.g.
    python benchmarks/profile_prune.py sparsevlm 1
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time

import torch

from visattn import tokenprune as tp
from visattn.bench import prune as bench
from visattn.tokenprune import hf_base, hf_llm, recycle, sparsevlm
from visattn.tokenprune import kernels as prune_kernels

TIMES: dict = collections.defaultdict(list)


def timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        TIMES[label].append((time.perf_counter() - t0) * 1e3)
        return out

    setattr(owner, name, staticmethod(inner) if isinstance(vars(owner).get(name), staticmethod) else inner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="a registered pruning method (as in visattn bench-prune)")
    parser.add_argument("batch", type=int)
    parser.add_argument("images", type=int, nargs="?", default=1, help="images per prompt")
    args = parser.parse_args(argv)
    method, batch, images = args.method, args.batch, args.images
    model = bench.build_model(False, "cuda", torch.float16)
    inputs = bench.make_inputs(model, batch, images, "cuda", torch.float16)
    pruner = bench.pruner_for(method, 64, 576)
    adapter, llm_stage = hf_base.HFVisionLanguageAdapter, hf_llm.LLMStage
    for owner, name in [(hf_llm, "decoder_row_scores"), (llm_stage, "_select_stage"),
                        (hf_llm, "append_recycled"), (hf_llm, "compact"), (hf_llm, "attention_mask_4d"),
                        (hf_llm, "rater_rows"), (hf_llm, "moved_rows"), (sparsevlm.SparseVLM, "rater_scores"),
                        (recycle, "compact"), (sparsevlm, "dpc_knn_merge"), (prune_kernels, "recycle_tokens"),
                        (adapter, "_rope"), (llm_stage, "_layer_prefill"), (adapter, "_lm_pre")]:
        timed(owner, name, f"{getattr(owner, '__name__', owner)}.{name}")
    tp.apply(model, pruner)
    with torch.no_grad():
        for i in range(6):
            if i == 2:
                TIMES.clear()
            model(**inputs, use_cache=True, logits_to_keep=1)
    calls = 4
    print(f"{method} b={batch} images={images}: per prefill (ms, mean over {calls} calls, synchronised)")
    for label, ts in sorted(TIMES.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {label:40s} {sum(ts) / calls:8.3f}  ({len(ts) // calls} calls per prefill)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
