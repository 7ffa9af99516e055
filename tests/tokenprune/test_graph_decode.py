"""bench-prune's graph decode (visattn.bench.graph_decode) against the stock ``generate()``, on the CPU.

The loop drives the decoder layers itself over a static, per-layer KV cache; the oracle is transformers'
``generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`` with the pruner attached (its dynamic cache and
the adapter's own decode hooks). Tiny random LLaVA, batch 2 with left padding (rows of different lengths). Greedy
tokens of a random model repeat a lot, so the logits of every step are compared too (a wrong position or mask moves
them by ~1e-2, far beyond float32 rounding)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tp_tiny import batch, pixels, prompt  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.bench import prune  # noqa: E402
from visattn.bench.graph_decode import StaticDecoder  # noqa: E402

N_IMG = 16  # (56 / 14) ** 2
ROWS = [(3, 4, 11), (6, 3, 12)]  # prefix, suffix, seed: different lengths -> left padding
KEEP = 4
NEW = 5

METHODS = {  # the reduced grid of bench-prune, then the other position / stage variants
    "none": lambda: None,
    "fastervlm": lambda: tp.FasterVLM(keep=KEEP),
    "visionzip": lambda: tp.create("visionzip", keep=KEEP),
    "divprune": lambda: tp.DivPrune(keep=KEEP),
    "fastv": lambda: tp.FastV(layer=2, keep=KEEP),
    "fastv-reindex": lambda: tp.FastV(layer=2, keep=KEEP, positions="reindex"),
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
}


def _inputs() -> dict:
    ids, mask = batch([prompt(p, N_IMG, s, seed) for p, s, seed in ROWS], "left")
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(len(ROWS), seed=7)}


def _eos(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _graph_loop(model, inputs, pruner, new=NEW):
    """(graph loop's N tokens, logits of its N - 1 steps, its cache slots per layer) with ``pruner`` attached."""
    if pruner is not None:
        tp.apply(model, pruner)
    logits = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.detach().reshape(2, -1).clone()))
    try:
        decoder = StaticDecoder(model, inputs, new)
        logits.clear()  # the prefill's own call
        decoder.run()
        return decoder.tokens.clone(), logits, decoder.cache_lengths
    finally:
        hook.remove()
        if pruner is not None:
            tp.remove(model)


def _stock(model, inputs, pruner, new=NEW):
    if pruner is not None:
        tp.apply(model, pruner)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        return out.sequences[:, inputs["input_ids"].shape[1]:], list(out.logits)
    finally:
        if pruner is not None:
            tp.remove(model)


def _check_against_generate(model, name, inputs=None):
    inputs = _inputs() if inputs is None else inputs
    tokens, logits, _ = _graph_loop(model, inputs, METHODS[name]())
    ref_tokens, ref_logits = _stock(model, inputs, METHODS[name]())
    assert ref_tokens.shape == (2, NEW)
    assert torch.equal(tokens, ref_tokens)
    assert len(logits) == NEW - 1
    keep = torch.ones(ref_logits[0].shape[-1], dtype=torch.bool)
    keep[_eos(model)] = False  # the loop masks the end-of-sequence ids itself (min_new_tokens = N)
    for step, (got, want) in enumerate(zip(logits, ref_logits[1:], strict=True)):
        torch.testing.assert_close(got[:, keep].float(), want[:, keep].float(), atol=2e-5, rtol=1e-5,
                                   msg=lambda m, step=step: f"{name}, decode step {step}: {m}")


@pytest.mark.parametrize("name", list(METHODS))
def test_graph_loop_matches_generate(models, name):
    _check_against_generate(models[0], name)


@pytest.mark.parametrize("name", ["none", "fastv"])
def test_graph_loop_matches_generate_with_eager_attention(models, name):
    """The eager twin: the loop's additive mask instead of SDPA's boolean one."""
    _check_against_generate(models[1], name)


@pytest.fixture(scope="module")
def llava_next():
    """Tiny LLaVA-NeXT and a left-padded batch of two images with different token counts (their own crops)."""
    from test_llava_next import SIZES, next_inputs
    from tp_tiny import tiny_llava

    model = tiny_llava("sdpa", next_=True)
    px, ids, mask, _ = next_inputs(model)
    return model, {"input_ids": ids, "attention_mask": mask, "pixel_values": px, "image_sizes": SIZES}


@pytest.mark.parametrize("name", ["none", "fastervlm", "fastv"])
def test_graph_loop_matches_generate_on_llava_next(llava_next, name):
    _check_against_generate(llava_next[0], name, llava_next[1])


def test_decode_layers_needs_a_pruned_prefill(models):
    model = models[0]
    assert tp.decode_layers(model) is None  # no pruner: the model's own decode
    tp.apply(model, METHODS["fastv"]())
    try:
        with pytest.raises(RuntimeError, match="no pruned prefill"):
            tp.decode_layers(model)
    finally:
        tp.remove(model)


def test_decode_layers_refuses_qwen2vl():
    from tp_tiny import tiny_qwen2vl

    model = tiny_qwen2vl("sdpa")
    tp.apply(model, tp.FastV(layer=2, keep=KEEP))
    try:
        with pytest.raises(NotImplementedError, match="M-RoPE"):
            tp.decode_layers(model)
    finally:
        tp.remove(model)
    with pytest.raises(NotImplementedError, match="LLaVA"):
        StaticDecoder(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, NEW)


def test_graph_loop_never_picks_end_of_sequence(models):
    """A model whose favourite token is the end-of-sequence id: min_new_tokens = N forbids it in generate(), and
    the loop must pick the same runner-up."""
    model = models[0]
    (eos,) = _eos(model)

    def favour_eos(module, args, output):
        output = output.clone()
        output[..., eos] = output.max() + 100.0
        return output

    handle = model.lm_head.register_forward_hook(favour_eos)
    try:
        inputs = _inputs()
        tokens, _, _ = _graph_loop(model, inputs, METHODS["fastervlm"]())
        ref_tokens, _ = _stock(model, inputs, METHODS["fastervlm"]())
    finally:
        handle.remove()
    assert not (tokens == eos).any()
    assert torch.equal(tokens, ref_tokens)


def test_static_cache_is_sized_per_layer(models):
    """Slots per decoder layer = the tokens that layer cached in the prefill + N, from the prompt's own counts:
    the padded prompt unpruned; each row loses its image's 16 - KEEP tokens from the first layer on (vision-stage
    FasterVLM) or from FastV's drop layer 2 on (layers 0-1 keep everything)."""
    model = models[0]
    layers = model.config.text_config.num_hidden_layers
    full = max(p + N_IMG + s for p, s, _ in ROWS)
    pruned = max(p + KEEP + s for p, s, _ in ROWS)
    inputs = _inputs()
    sizes = {name: _graph_loop(model, inputs, METHODS[name]())[2] for name in ("none", "fastervlm", "fastv")}
    assert sizes["none"] == [full + NEW] * layers
    assert sizes["fastervlm"] == [pruned + NEW] * layers
    assert sizes["fastv"] == [full + NEW] * 2 + [pruned + NEW] * (layers - 2)
    assert sum(sizes["fastervlm"]) < sum(sizes["fastv"]) < sum(sizes["none"])


def test_measure_graph_decode_row_on_cpu(models):
    """The bench's graph-mode row on the CPU: the eager step (no capture there), the generate() check recorded,
    the result keys of the generate mode kept."""
    model = models[0]
    inputs = _inputs()
    tp.apply(model, METHODS["fastv"]())
    try:
        row = prune.measure_graph_decode(model, inputs, NEW, 2, "cpu")
    finally:
        tp.remove(model)
    assert row["decode_mode"] == "static-eager" and row["decode_graph_error"] is None
    assert row["decode_tokens_match"] is True and row["decode_tokens_first_mismatch"] is None
    assert row["new_tokens_per_sample"] == [NEW, NEW] and len(row["decode_calls_ms"]) == 2
    assert row["decode_tok_s"] == pytest.approx(
        prune.spread([2 * (NEW - 1) / ms * 1e3 for ms in row["decode_calls_ms"]])["median"])
    assert len(row["static_cache_tokens"]) == model.config.text_config.num_hidden_layers


def test_graph_decode_refuses_bad_arguments(models):
    inputs = _inputs()
    with pytest.raises(ValueError, match="new_tokens"):
        StaticDecoder(models[0], inputs, 1)
    with pytest.raises(ValueError, match="decode_mode"):
        prune.measure(models[0], inputs, None, 1, NEW, "cpu", decode_mode="static")
    with pytest.raises(ValueError, match="decode_tokens"):
        prune.measure_graph_decode(models[0], inputs, 1, 2, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["none", "fastervlm", "fastv"])
def test_graph_capture_on_cuda_matches_generate(models, name):
    """On CUDA the step is captured once and replayed; float32, so the greedy tokens must equal generate()'s."""
    model = models[0].cuda()
    try:
        inputs = {k: v.cuda() for k, v in _inputs().items()}
        if METHODS[name]() is not None:
            tp.apply(model, METHODS[name]())
        try:
            row = prune.measure_graph_decode(model, inputs, NEW, 2, "cuda")
        finally:
            if METHODS[name]() is not None:
                tp.remove(model)
        assert row["decode_mode"] == "graph", row["decode_graph_error"]
        assert row["decode_tokens_match"] is True
    finally:
        models[0].cpu()
