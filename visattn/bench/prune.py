"""``visattn bench-prune``: token pruning on LLaVA-shaped (and, with ``--qwen-videos``, Qwen2.5-VL-shaped video)
models with random weights (no downloads).

Models: a LLaVA-1.5-7B-architecture model (Llama-7B text config, CLIP ViT-L/14 at 336 px, 2-layer MLP projector,
576 visual tokens per image) and a LLaVA-NeXT-shaped workload (the same model fed 5 crops per sample, 2880 visual
tokens). fp16, ``attn_implementation="sdpa"``. Per configuration: time to first token (vision tower + scoring +
LLM prefill), LLM prefill time alone, prefill tokens/s (prompt tokens before pruning / TTFT), decode tokens/s,
peak memory, scoring time (CUDA events around the scorer) and its share of the pruned TTFT, and whether the kept
counts were the same in every timed call (``kept_stable``). A configuration a method refuses (a ``ValueError``
building it or at ``tp.apply``, e.g. a Pooling budget that is no pooled size of the grid) is listed in the result's
``skipped`` with the reason, and the run goes on.
``--qwen-videos B,...`` adds a video workload (shape ``qwen2.5-vl-video``, :func:`build_qwen_model`): a
Qwen2.5-VL-7B-architecture model with random weights fed ``--qwen-frames`` frames (default 32) at 448x448 per sample,
i.e. ``video_grid_thw`` = (frames/2, 32, 32) and (frames/2)·256 video tokens after the 2x2 merge, with a short text
prompt (inputs built by hand: :func:`make_qwen_inputs`). Its methods (``--qwen-methods``; default: DivPrune,
Random, Uniform, temporal-merge with DivPrune per frame, FastV) prune every frame; each ``--keeps`` value (per
576-token image) is scaled to the frame's token count (64 -> 28 of 256). Those rows always decode with
``generate()`` (the graph decode does not handle M-RoPE; the row's ``decode_mode`` says so) and report the kept
tokens of every frame (``frame_kept``); TTFT is their main figure. The Qwen model is built only when asked for,
after the LLaVA rows and their model are done and freed. ``--fast-vision`` runs that model's vision attention through
:func:`visattn.tokenprune.patch_vision_attention` (one attention call per distinct window / frame length instead of
one per chunk) for ALL its rows, the unpruned baseline included, so the speed-ups stay comparable; the result
header and every video row record it (``fast_vision``).
``--tiny`` runs tiny configs on the CPU (smoke test). Any registered method runs by name (``--methods``); the ones
without a budget run as their defaults say (ZipVL: ``tau``), DyMU with thresholds found by its own search on the
row's images for about ``--keeps`` tokens (:func:`dymu_for`).

Decode: exactly ``--decode-tokens`` N new tokens per sample (no EOS token; ``min_new_tokens`` = ``max_new_tokens``),
decode time = the N - 1 steps after the first token, with no prefill in it. Two modes (``--decode-mode``):

* ``graph`` (default on CUDA): the pruned prefill runs once through ``generate(max_new_tokens=1)``, its KV cache is
  copied into a static cache sized per decoder layer (that layer's prefill length + N: a pruned configuration reads
  less KV per step), and the N - 1 steps run as replays of one CUDA graph of a greedy step of our own
  (:mod:`visattn.bench.graph_decode`), timed with CUDA events between replays. The first of the
  ``--decode-calls`` + 1 calls is the warm-up; every round checks the greedy tokens against ``generate()``'s
  (``decode_tokens_match``). A failed capture falls back to the same step run eagerly and says so
  (``decode_mode: "static-eager"``, ``decode_graph_error``).
* ``generate`` (default elsewhere): ``generate()`` with the default dynamic cache, after one untimed warm-up call of
  the same length. A logits processor marks every generation step (a CUDA event on the GPU, ``perf_counter`` on the
  CPU: ``timer`` in the result); decode time is the span from the first token's logits to the N-th, with no
  ``generate()`` set-up in it. Host-bound for a 7B model at these batch sizes.

Per configuration ``--decode-calls`` timed calls per round, rounds interleaved; the figure is the median of every
timed call with its min and max, and a pruned configuration whose fastest call decodes slower than the unpruned
model's slowest call at the same shape and batch is flagged (``decode_slower_than_baseline``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from visattn.bench.report import decode_range as _range
from visattn.bench.report import graph_decode_checks, prune_models
from visattn.bench.report import number as _num
from visattn.bench.report import prune_table as table

PREFIX, SUFFIX, IMAGE_TOKEN = 35, 40, 32000
#: the shape name of the Qwen2.5-VL video rows (``--qwen-videos``)
QWEN_SHAPE = "qwen2.5-vl-video"
#: the methods of the video rows when ``--methods`` is not given
QWEN_METHODS = ("divprune", "random", "uniform", "temporal-merge", "fastv")
#: frame side in pixels (full / ``--tiny``) and the default number of input frames per video
QWEN_SIDE, QWEN_TINY_SIDE = 448, 32
QWEN_FRAMES, QWEN_TINY_FRAMES = 32, 8
#: the released Qwen2.5-VL tokenizer's special ids (image, video, vision start / end); tiny configs use small ones
QWEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653}
QWEN_TINY_IDS = {"image_token_id": 900, "video_token_id": 901, "vision_start_token_id": 902,
                 "vision_end_token_id": 903}
#: values of ``--decode-mode``
DECODE_MODES = ("generate", "graph")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny random configs on CPU (smoke test)")
    parser.add_argument("--quick", action="store_true", help="reduced grid")
    parser.add_argument("--methods", default=None, help="comma list (default: all); an LLM-side method with "
                        "'+eager' (e.g. pdrop+eager) scores with eager ops instead of the fused kernel")
    parser.add_argument("--keeps", default=None, help="comma list of kept tokens per 576-token image")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes for LLaVA-1.5")
    parser.add_argument("--next-batches", default=None, help="comma list of batch sizes for the NeXT shape")
    parser.add_argument("--qwen-videos", default="", help="comma list of batch sizes for the Qwen2.5-VL-7B video "
                        f"shape ({QWEN_SHAPE}; default: none)")
    parser.add_argument("--qwen-methods", default=None,
                        help="comma list of methods for the Qwen video rows (default: --methods when given, else "
                        f"{','.join(QWEN_METHODS)})")
    parser.add_argument("--qwen-frames", type=int, default=None,
                        help=f"input frames per video of the Qwen rows (even; default {QWEN_FRAMES}, tiny: "
                        f"{QWEN_TINY_FRAMES}), {QWEN_SIDE}x{QWEN_SIDE} each")
    parser.add_argument("--fast-vision", action="store_true",
                        help="batch the Qwen video model's vision attention by chunk length "
                        "(tokenprune.patch_vision_attention) for all its rows, the unpruned one included")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="new tokens per sample and decode call, exactly (default 16; tiny: 3); decode = the "
                        "last N - 1 steps")
    parser.add_argument("--decode-calls", type=int, default=2,
                        help="timed decode calls per configuration and round, after one warm-up call")
    parser.add_argument("--decode-mode", choices=DECODE_MODES, default=None,
                        help="graph: a CUDA graph of a greedy step over a per-layer static KV cache (default on "
                        "CUDA); generate: generate() with the dynamic cache (default elsewhere)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the grid, interleaved; report median rounds")
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds; later configs are skipped")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--out", default=None, help="result file (default: <out-dir>/prune-<date>[-tiny].json)")
    parser.add_argument("--doc", default="docs/PRUNE_PERF.md", help="markdown page to write ('' to skip)")


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """Random-weight LLaVA-1.5-7B architecture (or a tiny one), SDPA attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=56, patch_size=14)
    else:
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _random_model(LlavaForConditionalGeneration, cfg, device, dtype)


def _random_model(cls, cfg, device: str, dtype: torch.dtype):
    """``cls`` with random weights from ``cfg``, built in ``dtype`` on ``device``, SDPA attention, greedy decode
    without an end-of-sequence token (every call generates exactly the tokens asked for)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls._from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(model, batch: int, images: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    cfg = model.config.vision_config
    per_image = (cfg.image_size // cfg.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(100, 30000, (batch, n), generator=g)  # noqa: E731
    ids = torch.cat([text(PREFIX), torch.full((batch, per_image * images), IMAGE_TOKEN), text(SUFFIX)], 1)
    px = torch.randn(batch * images, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": px.to(device, dtype)}


def qwen_config(tiny: bool):
    """The Qwen2.5-VL-7B architecture (the released config's text and vision fields, special token ids and M-RoPE
    sections), or a tiny one for ``--tiny``: keyword arguments that transformers 5.17 and 5.25 both accept."""
    from transformers import Qwen2_5_VLConfig

    if tiny:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, bos_token_id=1,
                    eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                      out_hidden_size=64, tokens_per_second=2)
        ids = QWEN_TINY_IDS
    else:
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    hidden_act="silu", use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                    bos_token_id=151643, eos_token_id=151645,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584, tokens_per_second=2,
                      hidden_act="silu")
        ids = QWEN_IDS
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=text["bos_token_id"],
                            eos_token_id=text["eos_token_id"], tie_word_embeddings=False, **ids)


def build_qwen_model(tiny: bool, device: str, dtype: torch.dtype):
    """Random-weight Qwen2.5-VL-7B architecture (:func:`qwen_config`; or a tiny one), SDPA attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _random_model(Qwen2_5_VLForConditionalGeneration, qwen_config(tiny), device, dtype)


def qwen_video_grid(vision_config, frames: int, side: int) -> tuple[int, int, int]:
    """``video_grid_thw`` of one video of ``frames`` input frames at ``side`` x ``side`` pixels: (frames / temporal
    patch, side / patch, side / patch). ValueError naming ``frames`` / ``side`` when they do not divide."""
    t_patch, patch, merge = (vision_config.temporal_patch_size, vision_config.patch_size,
                             vision_config.spatial_merge_size)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < t_patch or frames % t_patch:
        raise ValueError(f"frames={frames!r}: expected a positive multiple of the temporal patch ({t_patch})")
    if isinstance(side, bool) or not isinstance(side, int) or side < patch * merge or side % (patch * merge):
        raise ValueError(f"side={side!r}: expected a positive multiple of patch x merge ({patch * merge})")
    return frames // t_patch, side // patch, side // patch


def make_qwen_inputs(model, batch: int, frames: int, side: int, device: str, dtype: torch.dtype,
                     seed: int = 0) -> dict:
    """Prompts of ``batch`` samples, each: PREFIX text tokens, <vision_start>, the video's placeholder tokens,
    <vision_end>, SUFFIX text tokens; and the video's patches as the Qwen2.5-VL processor lays them out
    (``pixel_values_videos``: (t·h·w, channels · temporal patch · patch²) per video, ``video_grid_thw``).
    The synthetic video has two scenes (first and second half of the grid's frames), every frame its scene plus
    5% noise, so adjacent frames are similar as in real video (temporal-merge finds runs to merge)."""
    cfg, vis = model.config, model.config.vision_config
    t, h, w = qwen_video_grid(vis, frames, side)
    tokens = t * h * w // vis.spatial_merge_size ** 2
    dim = vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2
    g = torch.Generator().manual_seed(seed)
    high = min(150000, cfg.video_token_id - 100)
    text = lambda n: torch.randint(10, high, (batch, n), generator=g)  # noqa: E731
    mark = lambda token: torch.full((batch, 1), token)  # noqa: E731
    ids = torch.cat([text(PREFIX), mark(cfg.vision_start_token_id), torch.full((batch, tokens), cfg.video_token_id),
                     mark(cfg.vision_end_token_id), text(SUFFIX)], 1)
    scene = (torch.arange(t) >= (t + 1) // 2).long()
    videos = [(s[scene] + 0.05 * torch.randn(t, h * w, dim, generator=g)).flatten(0, 1)
              for s in torch.randn(batch, 2, h * w, dim, generator=g)]
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
              "pixel_values_videos": torch.cat(videos).to(device, dtype),
              "video_grid_thw": torch.tensor([[t, h, w]] * batch, device=device)}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # newer transformers: 2 marks video
        inputs["mm_token_type_ids"] = (ids == cfg.video_token_id).int().to(device) * 2
    return inputs


def pruner_for(name: str, keep: int, per_image: int, llm_layers: int = 32):
    from visattn import tokenprune as tp

    if name == "pdrop":
        return tp.PyramidDrop() if llm_layers > 24 else tp.PyramidDrop(layers=[1, 2, 3])
    if name == "visionzip":
        return tp.create("visionzip", keep=keep)
    if name == "vtc-cls":
        return tp.VTCCLS(keep=keep, start_layer=12 if per_image > 100 else 1)
    if name == "fastv":
        return tp.FastV(layer=2, keep=keep)
    if name == "zipvl":  # no budget: the kept count follows the attention mass threshold tau (default 0.975)
        return tp.ZipVL(layer=2)
    return tp.create(name, keep=keep)


def dymu_for(model, pixel_values: torch.Tensor, keep: int, per_image: int):
    """DyMU with thresholds found by its own search (DToMe, :func:`visattn.tokenprune.dymu.find_thresholds`) on
    ``pixel_values``, with ToMe's ``r`` spread evenly over the tower's layers up to the feature layer so that about
    ``keep`` of the ``per_image`` patch tokens remain: the budget a fixed-``r`` ToMe would keep, which DyMU's
    per-image thresholds then vary around. Random weights make the thresholds arbitrary; the row measures cost."""
    from visattn import tokenprune as tp
    from visattn.tokenprune.dymu import find_thresholds

    tower = model.model.vision_tower
    layers = len(getattr(tower, "vision_model", tower).encoder.layers)
    feature = model.config.vision_feature_layer
    used = layers + 1 + feature if feature < 0 else feature  # encoder layers before the features the projector reads
    r = max(0, per_image - keep) // max(1, used)
    with torch.no_grad():
        thresholds = find_thresholds(tower, [pixel_values], r=[r] * used + [0] * (layers - used))
    return tp.DyMU(thresholds=thresholds)


def row_pruner(model, pixel_values: torch.Tensor, method: str | None, keep: int, per_image: int):
    """The pruner of one row (None for the unpruned row): DyMU with thresholds found (DToMe) on the row's images
    for about ``keep`` tokens (:func:`dymu_for`; it has no budget), any other method by :func:`pruner_for`."""
    if method is None:
        return None
    if method == "dymu":
        return dymu_for(model, pixel_values, keep, per_image)
    return pruner_for(method, keep, per_image, model.config.text_config.num_hidden_layers)


def attachable(model, make, *args) -> tuple[object, str | None]:
    """``(pruner, None)`` with ``pruner = make(*args)`` when ``tp.apply(model, pruner)`` accepts it (it is detached
    again; ``make`` may return None: no pruner), else ``(None, why)``: the ValueError's message of ``make`` or of
    ``tp.apply`` refusing the configuration (e.g. a Pooling budget that is no pooled size of the grid)."""
    from visattn import tokenprune as tp

    try:
        pruner = make(*args)
        if pruner is not None:
            tp.apply(model, pruner)
            tp.remove(model)
    except ValueError as err:
        return None, str(err)
    return pruner, None


class _Clock:
    """Wall time of a callable, CUDA-synchronised."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3


def _lm_timer(model):
    """Hooks that time the language model's prefill calls (ms) into a list."""
    lm = model.model.language_model
    times: list[float] = []
    state: dict = {}

    def pre(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None and emb.shape[1] > 1:
            if emb.is_cuda:
                torch.cuda.synchronize()
            state["t0"] = time.perf_counter()

    def post(module, args, kwargs, out):
        if "t0" in state:
            if out.last_hidden_state.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - state.pop("t0")) * 1e3)

    handles = [lm.register_forward_pre_hook(pre, with_kwargs=True), lm.register_forward_hook(post, with_kwargs=True)]
    return times, handles


@contextlib.contextmanager
def _gc_paused():
    """Collect once, then keep the garbage collector off: a collection inside a timed call is host noise."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timer_kind(device: str) -> str:
    """What times decode steps on ``device``: ``"cuda_events"`` on CUDA, else ``"perf_counter"``."""
    return "cuda_events" if str(device).startswith("cuda") else "perf_counter"


class StepMarks:
    """A ``generate()`` logits processor that marks the end of every generation step.

    ``start()`` marks the moment just before ``generate()`` is called; ``generate()`` then calls the processor once
    per new token, right after that token's logits are computed, so mark ``i`` (``i >= 1``) ends step ``i`` (step 1 is
    the prefill). On CUDA a mark is a CUDA event recorded on the current stream (no synchronisation: the recording
    costs microseconds of host time per step); elsewhere it is ``time.perf_counter()`` (host code is synchronous
    there). ``kind`` says which: ``"cuda_events"`` or ``"perf_counter"``.
    """

    def __init__(self, device: str, steps: int):
        if steps < 1:
            raise ValueError(f"steps={steps}: need at least one generated token")
        self.cuda = str(device).startswith("cuda")
        self.kind = timer_kind(device)
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if self.cuda else []
        self.marks: list = []

    def start(self) -> None:
        self.marks = []
        self._mark()

    def _mark(self) -> None:
        if not self.cuda:
            self.marks.append(time.perf_counter())
            return
        if len(self.marks) >= len(self._events):  # more steps than announced: never reuse a recorded event
            self._events.append(torch.cuda.Event(enable_timing=True))
        event = self._events[len(self.marks)]
        event.record()
        self.marks.append(event)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._mark()
        return scores

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks: [start -> first token's logits, then one per decode step]."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def spread(values: list[float]) -> dict:
    """``{"median", "min", "max", "n"}`` of ``values`` (NaN entries ignored; all NaN when none is left)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def decode_call(model, inputs: dict, tokens: int, device: str) -> dict:
    """One ``generate()`` of exactly ``tokens`` new tokens per sample, every step marked (see :class:`StepMarks`).

    Returns ``new_tokens`` and ``new_tokens_per_sample`` (counted from the output, each row up to its first
    end-of-sequence token if the model has one), ``steps`` (logits-processor calls), ``generate_ttft_ms``
    (``generate()`` call to the first token's logits: set-up + prefill) and ``step_ms`` (one entry per decode step,
    ``tokens - 1`` of them). Raises ``RuntimeError`` when ``generate()`` produced another number of tokens."""
    from transformers import LogitsProcessorList

    marks = StepMarks(device, tokens)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        marks.start()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([marks]))
    intervals = marks.intervals_ms()
    per_sample = new_tokens_per_sample(out[:, prompt:], model.generation_config.eos_token_id)
    if any(n != tokens for n in per_sample) or len(intervals) != tokens:
        raise RuntimeError(f"generate() made {per_sample} new tokens per sample in {len(intervals)} steps, "
                           f"asked for {tokens}")
    return {"new_tokens": tokens, "new_tokens_per_sample": per_sample, "steps": len(intervals),
            "generate_ttft_ms": intervals[0], "step_ms": intervals[1:]}


def new_tokens_per_sample(generated: torch.Tensor, eos_token_id: int | list[int] | None) -> list[int]:
    """Tokens each row of ``generated`` (B, T: the new tokens only) really generated: up to and including its first
    end-of-sequence token when ``eos_token_id`` is set (``generate()`` pads a finished row to the batch's length),
    else all T."""
    if eos_token_id is None:
        return [generated.shape[1]] * generated.shape[0]
    ids = torch.as_tensor(eos_token_id, device=generated.device).reshape(-1)
    is_eos = torch.isin(generated, ids)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated.shape[1])
    return first.tolist()


def measure_decode(model, inputs: dict, tokens: int, calls: int, device: str) -> dict:
    """Decode figures of one configuration in one round: one warm-up ``generate()`` (its decode time is kept as
    ``decode_warmup_ms``: the first call after the allocator was emptied), then ``calls`` timed ones with the garbage
    collector paused. ``decode_calls_ms``: the N - 1 decode steps of each timed call; ``decode_samples_tok_s``: the
    same as tokens/s over the batch."""
    _check_decode_args(tokens, calls)
    bsz = inputs["input_ids"].shape[0]
    warm = decode_call(model, inputs, tokens, device)
    with _gc_paused():
        timed = [decode_call(model, inputs, tokens, device) for _ in range(calls)]
    return {
        "new_tokens": timed[0]["new_tokens"], "new_tokens_per_sample": timed[0]["new_tokens_per_sample"],
        **_decode_summary(warm["step_ms"], [c["step_ms"] for c in timed], bsz, tokens),
        "generate_ttft_ms": statistics.median(c["generate_ttft_ms"] for c in timed),
    }


def measure_graph_decode(model, inputs: dict, tokens: int, calls: int, device: str, check: bool = True) -> dict:
    """Decode figures of one configuration in one round, ``--decode-mode graph`` (module docstring): one prefill,
    a static per-layer cache (:class:`~visattn.bench.graph_decode.StaticDecoder`), the step captured as a CUDA
    graph on CUDA (eager elsewhere, or when capture fails: ``decode_graph_error`` says why), one warm-up decode call
    (``decode_warmup_ms``), then ``calls`` timed ones with the garbage collector paused; the same keys as
    :func:`measure_decode` plus ``decode_mode`` (``"graph"`` / ``"static-eager"``), ``static_cache_tokens`` (slots
    per decoder layer) and, with ``check``, ``decode_tokens_match`` (the N greedy tokens equal those of
    ``generate(max_new_tokens=N, min_new_tokens=N)``) and ``decode_tokens_first_mismatch`` (the index of the first
    new token where a sample differs, 0 being the prefill's; None when none does)."""
    from visattn.bench.graph_decode import StaticDecoder

    _check_decode_args(tokens, calls)
    bsz, prompt = inputs["input_ids"].shape
    t0 = time.perf_counter()
    decoder = StaticDecoder(model, inputs, tokens)
    setup_ms = (time.perf_counter() - t0) * 1e3
    mode, error = "static-eager", None
    if decoder.cuda:
        try:
            decoder.capture()
            mode = "graph"
        except Exception as err:  # noqa: BLE001 - recorded in the row and printed, never silent
            decoder.graph = None
            error = f"{type(err).__name__}: {err}"
    try:
        warm = decoder.run()
        with _gc_paused():
            timed = [decoder.run() for _ in range(calls)]
        graph_tokens = decoder.tokens.clone()
        cache_tokens = decoder.cache_lengths
    finally:
        decoder.close()
    match = first = None
    if check:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        same = (ref[:, prompt:] == graph_tokens).all(0).tolist() if ref.shape[1] - prompt == tokens else [False]
        match = all(same)
        first = None if match else same.index(False)
    return {
        "new_tokens": tokens, "new_tokens_per_sample": [tokens] * bsz,
        "decode_mode": mode, "decode_graph_error": error, "decode_setup_ms": setup_ms,
        "decode_tokens_match": match, "decode_tokens_first_mismatch": first, "static_cache_tokens": cache_tokens,
        **_decode_summary(warm, timed, bsz, tokens),
        "generate_ttft_ms": float("nan"),
    }


def _check_decode_args(tokens: int, calls: int) -> None:
    if tokens < 2:
        raise ValueError(f"decode_tokens={tokens}: need at least 2 (decode = the steps after the first token)")
    if calls < 1:
        raise ValueError(f"decode_calls={calls}: need at least one timed call")


def _decode_summary(warm_steps: list[float], timed_steps: list[list[float]], batch: int, tokens: int) -> dict:
    """The decode keys both modes share, from the per-step ms of the warm-up call and of each timed call: each
    call's decode time and tokens/s (``batch * (tokens - 1)`` new tokens), the median and slowest step, and the
    figure (median tokens/s with its min and max)."""
    calls_ms = [sum(c) for c in timed_steps]
    steps = [t for c in timed_steps for t in c]
    samples = [batch * (tokens - 1) / ms * 1e3 if ms > 0 else float("nan") for ms in calls_ms]
    return {"decode_warmup_ms": sum(warm_steps), "decode_calls_ms": calls_ms, "decode_samples_tok_s": samples,
            "decode_step_ms": statistics.median(steps), "decode_step_max_ms": max(steps), **_decode_figure(samples)}


def _decode_figure(samples: list[float]) -> dict:
    s = spread(samples)
    return {"decode_tok_s": s["median"], "decode_tok_s_min": s["min"], "decode_tok_s_max": s["max"]}


def _repeat(clock, fn, iters: int, after=None, min_seconds: float = 1.0, max_iters: int = 25) -> list[float]:
    """At least ``iters`` timings, more (up to ``max_iters``) until ``min_seconds`` are spent: batch-1 prefills are
    host-bound and vary by tens of percent between calls, so short configs get more samples for their median.
    The garbage collector is paused while timing (a collection inside one sample is host noise, not pruning)."""
    with _gc_paused():
        times: list[float] = []
        while len(times) < iters or (sum(times) < min_seconds * 1e3 and len(times) < max_iters):
            times.append(clock(fn))
            if after is not None:
                after()
        return times


def measure(model, inputs: dict, method, iters: int, decode_tokens: int, device: str, decode_calls: int = 2,
            min_seconds: float = 1.0, decode_mode: str = "generate") -> dict:
    """One configuration, one round: TTFT (prefill calls, CUDA-synchronised wall time), then decode
    (:func:`measure_decode`, or :func:`measure_graph_decode` for ``decode_mode="graph"``) on the same model and
    inputs, the pruner attached for both."""
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode={decode_mode!r}: expected one of {DECODE_MODES}")
    from visattn import tokenprune as tp

    clock = _Clock(device)
    if method is not None:
        tp.apply(model, method, timing=True)
    lm_times, handles = _lm_timer(model)
    try:
        with torch.no_grad():
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            if device.startswith("cuda"):  # every config starts from an empty allocator cache (no inherited
                torch.cuda.empty_cache()   # fragmentation from the previous config's generate())
            for _ in range(2):
                clock(prefill)
            lm_times.clear()
            scorings: list[float] = []
            kept_calls: set[tuple] = set()  # each timed call's kept counts: a dynamic method must repeat its own

            def read_scoring():
                rep = tp.last_report(model)
                scorings.append(rep.scoring_ms)
                kept_calls.add(tuple(rep.visual_tokens_kept))

            ttft = _repeat(clock, prefill, iters, None if method is None else read_scoring,
                           min_seconds=min_seconds)
            report = tp.last_report(model) if method is not None else None
            scoring = statistics.median(scorings) if scorings else 0.0
        for h in handles:  # the LM-prefill timer stays out of generate()
            h.remove()
        handles = []
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if decode_mode == "graph":
            decode = measure_graph_decode(model, inputs, decode_tokens, decode_calls, device)
        else:
            decode = {**measure_decode(model, inputs, decode_tokens, decode_calls, device), "decode_mode": "generate"}
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    finally:
        for h in handles:
            h.remove()
        if method is not None:
            tp.remove(model)
    bsz, length = inputs["input_ids"].shape
    t = statistics.median(ttft)
    llm = statistics.median(lm_times[: len(ttft)]) if lm_times else float("nan")
    row = {
        "prompt_tokens": length, "ttft_ms": t, "llm_prefill_ms": llm, "ttft_min_ms": min(ttft), "samples": len(ttft),
        "llm_prefill_min_ms": min(lm_times[: len(ttft)]) if lm_times else float("nan"),
        "prefill_tok_s": bsz * length / t * 1e3, "peak_gib": peak, "scoring_ms": scoring,
        "scoring_pct": 100.0 * scoring / t, "decode_tokens": decode_tokens, **decode,
    }
    if report is not None:
        # False: the kept counts changed between the timed calls of the same inputs (a nondeterministic
        # selection; every shape after it, and each shape-keyed cache, then changes from call to call too)
        row["kept_stable"] = len(kept_calls) <= 1
        row.update(llm_visual_tokens=report.visual_tokens_kept[0], layer_avg_visual=report.visual_tokens_layer_avg[0],
                   flops_saved=report.flops_saved[0], visual_tokens=report.visual_tokens[0])
        if "frame_kept" in report.extra:  # videos: per video of the first sample, the kept tokens of every frame
            row["frame_kept"] = report.extra["frame_kept"][0]
    return row


def _ints(text: str | None, default: list[int], flag: str) -> list[int]:
    """A comma list of positive ints (``None``: ``default``; ``""``: none). ValueError naming ``flag``."""
    if text is None:
        return default
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected a comma list of positive integers") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag}={text!r}: expected a comma list of positive integers")
    return values


def grid(args) -> list[tuple[str, int, int, str, int | None]]:
    """(shape, images per sample, batch, method, keep) in priority order; the Qwen video rows last, with the input
    frames per video as their images and the keep per 576-token image (scaled per frame when run)."""
    all_methods = ["fastervlm", "visionzip", "divprune", "vtc-cls", "fastv", "pdrop", "sparsevlm"]
    methods = args.methods.split(",") if args.methods else all_methods
    if args.tiny:
        keeps, b15, bnx = [4], [1, 2], [1]
        methods = methods if args.methods else all_methods
    elif args.quick:
        keeps, b15, bnx = [64], [1, 8], [1]
        methods = args.methods.split(",") if args.methods else ["fastervlm", "visionzip", "divprune", "fastv"]
    else:
        keeps, b15, bnx = [192, 128, 64], [1, 8, 32], [1, 8]
    keeps = _ints(args.keeps or None, keeps, "--keeps")
    b15 = _ints(args.batches, b15, "--batches")
    bnx = _ints(args.next_batches, bnx, "--next-batches")
    qwen = _ints(getattr(args, "qwen_videos", ""), [], "--qwen-videos")
    frames = getattr(args, "qwen_frames", None) or (QWEN_TINY_FRAMES if args.tiny else QWEN_FRAMES)
    if qwen and (frames < 2 or frames % 2):
        raise ValueError(f"--qwen-frames={frames}: expected a positive even number (2 frames per temporal patch)")
    out = []

    def block(shape, images, batch, ks, ms):
        out.append((shape, images, batch, "none", None))
        for m in ms:
            for k in ([None] if m.startswith("pdrop") else ks):
                out.append((shape, images, batch, m, k))

    big = lambda b: b >= 32 and not args.tiny  # noqa: E731
    for b in b15:
        if not big(b):
            block("llava-1.5", 1, b, keeps, methods)
    for b in bnx:
        block("llava-next", 5, b, keeps if b == 1 else keeps[-1:], methods)
    for b in b15:
        if big(b):
            block("llava-1.5", 1, b, keeps[-1:], methods)
    for b in qwen:
        qwen_methods = getattr(args, "qwen_methods", None) or args.methods  # --qwen-methods, else --methods
        block(QWEN_SHAPE, frames, b, keeps, qwen_methods.split(",") if qwen_methods else list(QWEN_METHODS))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-prune", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.decode_tokens is not None and args.decode_tokens < 2:
        raise ValueError(f"--decode-tokens={args.decode_tokens}: need at least 2 (decode = the steps after the first)")
    if args.decode_calls < 1:
        raise ValueError(f"--decode-calls={args.decode_calls}: need at least one timed call")
    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds}: need at least one round")
    import transformers

    from visattn import backends
    from visattn.bench.common import environment
    from visattn.tokenprune.kernels import FAMILY

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.float16
    iters = args.iters or (1 if args.tiny else 3)
    decode_tokens = args.decode_tokens or (3 if args.tiny else 16)
    decode_mode = args.decode_mode or ("graph" if device == "cuda" else "generate")
    min_seconds = 0.0 if args.tiny else 1.0
    started = time.perf_counter()
    rows, skipped, baselines = [], [], {}
    configs = grid(args)
    cache_implementation = None
    fast_vision = None  # what patch_vision_attention did to the Qwen model (--fast-vision)
    # one model at a time: the LLaVA rows (rounds interleaved), then, only when asked for, the Qwen video rows
    for family in ([c for c in configs if c[0] != QWEN_SHAPE], [c for c in configs if c[0] == QWEN_SHAPE]):
        if not family:
            continue
        qwen = family[0][0] == QWEN_SHAPE
        model = (build_qwen_model if qwen else build_model)(args.tiny, device, dtype)
        cache_implementation = cache_implementation or model.generation_config.cache_implementation
        inputs = None
        print(f"{_stamp(started)} {'Qwen2.5-VL' if qwen else 'LLaVA'} model built on {device}", flush=True)
        if qwen:
            vis = model.config.vision_config
            reference = 16 if args.tiny else 576  # --keeps counts tokens of a LLaVA (CLIP 336 px) image
            side = QWEN_TINY_SIDE if args.tiny else QWEN_SIDE
            per_image = (side // vis.patch_size // vis.spatial_merge_size) ** 2  # tokens per frame
            if args.fast_vision:  # every Qwen row, the unpruned baseline included
                from visattn.tokenprune import patch_vision_attention

                fast_vision = str(patch_vision_attention(model))
                print(f"{_stamp(started)} --fast-vision: {fast_vision}", flush=True)
        else:
            reference = per_image = (model.config.vision_config.image_size
                                     // model.config.vision_config.patch_size) ** 2
        for index, (shape, images, batch, method, keep) in enumerate(family * args.rounds):
            row_round = index // len(family)
            if time.perf_counter() - started > args.time_budget:
                skipped.append({"shape": shape, "batch": batch, "method": method, "keep": keep,
                                "round": row_round, "reason": "time budget"})
                continue
            # tokens kept per image (NeXT shape: per crop, i.e. the same ratio; Qwen video: per frame, scaled)
            scaled_keep = keep if keep is None else max(1, round(keep * per_image / reference))
            inputs = (make_qwen_inputs(model, batch, images, side, device, dtype) if qwen
                      else make_inputs(model, batch, images, device, dtype))
            base_method, _, variant = method.partition("+")  # "pdrop+eager": LLM-side scores on eager ops (A/B peer)
            try:
                if base_method == "dymu" and qwen:
                    raise NotImplementedError("DyMU on Qwen2.5-VL is not supported (no CLIP-style vision tower)")
                pruner, refused = attachable(model, row_pruner, model, inputs.get("pixel_values"),
                                             None if method == "none" else base_method, scaled_keep or 1, per_image)
                if refused is not None:  # a budget or configuration the method refuses: skip it, run the rest
                    skipped.append({"shape": shape, "batch": batch, "method": method, "keep": keep,
                                    "round": row_round, "reason": f"refused: {refused}"})
                    continue
                # "+eager": the pruning kernels' reference backend (eager ops) for this config only
                backend = "reference" if variant == "eager" else backends.get_backend(FAMILY)
                with backends.use_backend(backend, family=FAMILY):
                    # graph decode does not handle M-RoPE: the video rows decode with generate()
                    row = measure(model, inputs, pruner, iters, decode_tokens, device, args.decode_calls,
                                  min_seconds, "generate" if qwen else decode_mode)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                skipped.append({"shape": shape, "batch": batch, "method": method, "keep": keep, "reason": "OOM"})
                continue
            except NotImplementedError as err:  # a method the model's adapter refuses (e.g. temporal-merge on LLaVA)
                skipped.append({"shape": shape, "batch": batch, "method": method, "keep": keep,
                                "round": row_round, "reason": f"not supported: {err}"})
                continue
            row.update(shape=shape, images=images, batch=batch, method=method, keep_per_image=scaled_keep,
                       round=row_round)
            if base_method == "dymu":  # which DyMU ran: the language model on the merged tokens, or VTU
                row.update(unmerge=pruner.unmerge, thresholds=pruner.thresholds)
            if qwen:  # images = grid frames (each one "image" to the pruner); keep_per_image = per frame,
                # keep_requested = the --keeps value it was scaled from (per LLaVA image)
                grid_thw = [int(v) for v in inputs["video_grid_thw"][0]]
                row.update(frames=images, images=grid_thw[0], video_grid_thw=grid_thw, keep_requested=keep,
                           kv_cache="dynamic", fast_vision=bool(args.fast_vision))
                row.setdefault("visual_tokens", grid_thw[0] * per_image)
            if method == "none":
                baselines[(shape, batch)] = row["ttft_ms"]
            row["ttft_speedup"] = baselines.get((shape, batch), float("nan")) / row["ttft_ms"]
            rows.append(row)
            print(f"{_stamp(started)} r{row['round']} " + _line(row), flush=True)
            if not row.get("kept_stable", True):
                print(f"FLAG: {method} keep={scaled_keep}: the kept counts changed between timed calls of the same "
                      "inputs (shapes vary per call: shape-keyed caches miss)", flush=True)
        del model, inputs
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    rows = _median_rounds(rows)
    flags = flag_slow_decode(rows)
    result = {
        "bench": "prune", **environment(device), "argv": list(argv) if argv is not None else sys.argv[1:],
        "rounds": args.rounds,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "transformers": transformers.__version__, "dtype": str(dtype),
        "attn_implementation": "sdpa", "tiny": args.tiny, "iters": iters,
        "fast_vision": bool(args.fast_vision), "fast_vision_patch": fast_vision,
        "timer": timer_kind(device), "decode_tokens": decode_tokens, "decode_steps": decode_tokens - 1,
        "decode_calls": args.decode_calls, "decode_warmup_calls": 1, "decode_mode": decode_mode,
        "kv_cache": "static per layer" if decode_mode == "graph" else cache_implementation or "dynamic",
        "decode_flags": flags, "configs": rows, "skipped": skipped, "wall_s": time.perf_counter() - started,
    }
    if args.out:
        path = Path(args.out)
    else:
        path = Path(args.out_dir) / f"prune-{_dt.date.today().isoformat()}{'-tiny' if args.tiny else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(result), indent=1, allow_nan=False))
    if args.doc and not args.tiny:  # the page is generated from every result file and its hand-written preamble
        from visattn.bench import report

        preamble = Path(args.doc).with_name("prune_preamble.md")
        page = report.render_prune(report.load_results(args.out_dir),
                                   *([preamble.read_text()] if preamble.is_file() else []))
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(page)
    print(f"\n{_stamp(started)} wrote {path}" + ("" if args.tiny or not args.doc else f" and {args.doc}"))
    print(table(rows))
    for f in flags:
        print(f"FLAG: {f['shape']} b={f['batch']} {f['method']} keep={f['keep_per_image']} decodes slower than the "
              f"unpruned model beyond the spread: {_range(f)} vs {_range(f['baseline'])} tok/s "
              f"(chance if equal: {_num(f['decode_flag_chance'], '.3g')})")
    return 0


def _stamp(started: float) -> str:
    return f"[{_dt.datetime.now().strftime('%H:%M:%S')} +{time.perf_counter() - started:6.1f}s]"


def strict_json(value):
    """``value`` with every non-finite float (a measurement that did not happen: NaN) replaced by None, so the
    result file is strict JSON (``null``), never ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def config_key(row: dict) -> tuple:
    """(shape, batch, method, keep per image): what identifies a configuration across rounds and runs."""
    return row["shape"], row["batch"], row["method"], row["keep_per_image"]


def _median_rounds(rows: list[dict]) -> list[dict]:
    """One row per config: the round with the median TTFT (its other columns kept with it), speed-up over the
    baseline's median round. Rounds interleave the configs, so slow drifts of the machine hit every method.
    Decode is pooled instead: the figure is the median of every timed ``generate()`` call of every round
    (``decode_tok_s``, with ``decode_tok_s_min`` / ``_max`` over the same calls), ``round_decode_tok_s`` the
    per-round medians."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(config_key(r), []).append(r)
    out, base = [], {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["ttft_ms"])
        row = dict(rs[(len(rs) - 1) // 2], round_ttft_ms=[r["ttft_ms"] for r in rs])
        if key[2] == "none":
            base[key[:2]] = row["ttft_ms"]
        row["ttft_speedup"] = base.get(key[:2], float("nan")) / row["ttft_ms"]
        if all("decode_samples_tok_s" in r for r in rs):
            rs = sorted(rs, key=lambda r: r["round"])
            samples = [v for r in rs for v in r["decode_samples_tok_s"]]
            row.update(_decode_figure(samples), decode_samples_tok_s=samples,
                       decode_calls_ms=[v for r in rs for v in r["decode_calls_ms"]],
                       round_decode_tok_s=[spread(r["decode_samples_tok_s"])["median"] for r in rs],
                       round_decode_warmup_ms=[r["decode_warmup_ms"] for r in rs],
                       decode_step_ms=statistics.median(r["decode_step_ms"] for r in rs),
                       decode_step_max_ms=max(r["decode_step_max_ms"] for r in rs),
                       new_tokens=min(r["new_tokens"] for r in rs))
            if any("decode_mode" in r for r in rs):  # every round's mode; a failed capture in any round shows
                row.update(decode_mode="+".join(sorted({r.get("decode_mode") for r in rs})),
                           decode_graph_error=next((r["decode_graph_error"] for r in rs
                                                    if r.get("decode_graph_error")), None))
            if any("decode_tokens_match" in r for r in rs):
                checks = [r.get("decode_tokens_match") for r in rs]
                row["decode_tokens_match"] = None if None in checks else all(checks)
                row["round_decode_tokens_match"] = checks
        out.append(row)
    return out


def flag_slow_decode(rows: list[dict]) -> list[dict]:
    """Compare every pruned row's decode with the unpruned row of the same shape and batch (in place).

    A pruned model decodes over a shorter KV cache, so it should never be slower. Sets ``decode_vs_baseline``
    (median over median) and ``decode_slower_than_baseline``: True when the pruned row's fastest call is slower than
    the baseline's slowest (the two ranges do not overlap), False when they overlap or the pruned row is faster, None
    when there is no baseline to compare with (and on the baseline rows). ``decode_flag_chance``: how often that
    happens by chance to m pruned and n baseline calls drawn from one distribution, 1 / C(m + n, m) (1/6 for 2 calls
    each, 1/924 for 2 calls x 3 rounds each; calls of one round share the machine's phase, so read it as a lower
    bound). Returns the flagged rows, each with its baseline's figures under ``baseline``."""
    base = {(r["shape"], r["batch"]): r for r in rows if r["method"] == "none"}
    flagged = []
    for r in rows:
        b = base.get((r["shape"], r["batch"])) if r["method"] != "none" else None
        figures = [x.get(k) for x in (r, b) if x is not None for k in ("decode_tok_s", "decode_tok_s_min",
                                                                         "decode_tok_s_max")]
        if b is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in figures):
            r.update(decode_vs_baseline=float("nan"), decode_slower_than_baseline=None, decode_flag_chance=None)
            continue
        r["decode_vs_baseline"] = r["decode_tok_s"] / b["decode_tok_s"]
        r["decode_slower_than_baseline"] = r["decode_tok_s_max"] < b["decode_tok_s_min"]
        m, n = len(r.get("decode_samples_tok_s", ())), len(b.get("decode_samples_tok_s", ()))
        r["decode_flag_chance"] = 1 / math.comb(m + n, m) if m and n else None
        if r["decode_slower_than_baseline"]:
            flagged.append({**{k: r[k] for k in ("shape", "batch", "method", "keep_per_image", "decode_tok_s",
                                                 "decode_tok_s_min", "decode_tok_s_max", "decode_vs_baseline",
                                                 "decode_flag_chance")},
                            "baseline": {k: b[k] for k in ("decode_tok_s", "decode_tok_s_min", "decode_tok_s_max")}})
    return flagged


def _line(r: dict) -> str:
    return (f"{r['shape']:10s} b={r['batch']:<3d} {r['method']:10s} keep={str(r['keep_per_image']):5s} "
            f"ttft={r['ttft_ms']:8.1f}ms x{r.get('ttft_speedup', float('nan')):.2f} llm={r['llm_prefill_ms']:8.1f}ms "
            f"dec={_range(r, '.1f')}tok/s step={_num(r.get('decode_step_ms'), '.2f')}ms "
            f"(max {_num(r.get('decode_step_max_ms'), '.1f')}, warm-up call "
            f"{_num(r.get('decode_warmup_ms'), '.0f')}ms) score={r['scoring_pct']:.1f}%"
            + _decode_mode_note(r))


def _decode_mode_note(r: dict) -> str:
    """`` [mode, tokens match / DIFFER at step i]`` of a graph-mode row, with the capture error if any."""
    if r.get("decode_mode", "generate") == "generate":
        return ""
    match = r.get("decode_tokens_match")
    check = ("" if match is None else ", tokens match generate()" if match
             else f", tokens DIFFER from generate() at step {r.get('decode_tokens_first_mismatch')}")
    error = f" (capture failed: {r['decode_graph_error']})" if r.get("decode_graph_error") else ""
    return f" [{r['decode_mode']}{check}]{error}"


def _decode_prose(result: dict) -> str:
    n = result["decode_tokens"]
    if "timer" not in result:  # results written before the step-timed decode
        return f"decode over {n} tokens via `generate()`"
    flagged = result.get("decode_flags") or []
    if result.get("decode_mode") == "graph":
        how = (f"decode = {n - 1} greedy steps after the prefill (exactly {n} new tokens), each a replay of one CUDA "
               "graph over a static KV cache sized per layer (prefill length + N), timed per step with CUDA events "
               f"after a warm-up call {graph_decode_checks(result['configs'])}")
    else:
        how = (f"decode = {n - 1} decode steps of `generate()` with exactly {n} new tokens, timed per step "
               f"({result['timer']}) after a warm-up call")
    return (f"{how}; median [min–max] of {result['decode_calls']} calls × "
            f"{result.get('rounds', 1)} round(s); **slower than none** marks a pruned row whose fastest call decodes "
            f"slower than the unpruned row's slowest ({len(flagged)} here)")


def markdown(result: dict) -> str:
    rounds = result.get("rounds", 1)
    repeats = f"; the median of {rounds} interleaved rounds of the grid" if rounds > 1 else ""
    return (
        "## Token pruning (visattn.tokenprune)\n\n"
        f"Measured {result['date']} on {result['device']}, torch {result['torch']}, transformers "
        f"{result['transformers']}, {result['dtype']}, SDPA, random weights ({prune_models(result['configs'])}). "
        "TTFT = vision tower + scoring + LLM prefill (median of at least "
        f"{result['iters']} calls{repeats}); {_decode_prose(result)}. "
        "`TTFT ×` is the speed-up over the unpruned model at the same shape and batch; `scoring %` is scoring time "
        "over the pruned TTFT (both medians over the same calls). Command: `python -m visattn.bench.prune`.\n\n"
        + table(result["configs"]) + "\n"
    )


def compare_runs(a: dict, b: dict, tolerance: float = 0.10) -> tuple[list[dict], bool]:
    """Every decode figure (``decode_tok_s`` of each configuration) of result ``a`` against result ``b``.

    One entry per configuration in either result: ``diff`` = (b - a) / a, ``passed`` when ``|diff| <= tolerance``;
    a configuration missing from one result or without a figure fails. Returns the entries and whether all passed."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance}: expected a fraction in [0, 1)")
    rows_a = {config_key(r): r for r in a["configs"]}
    rows_b = {config_key(r): r for r in b["configs"]}
    out = []
    for key in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        ra, rb = rows_a.get(key, {}), rows_b.get(key, {})
        va, vb = ra.get("decode_tok_s"), rb.get("decode_tok_s")
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (va, vb))
        diff = (vb - va) / va if ok else None
        out.append({"config": key, "a": ra, "b": rb, "diff": diff, "passed": ok and abs(diff) <= tolerance})
    return out, all(e["passed"] for e in out)


def comparison_table(entries: list[dict], tolerance: float = 0.10) -> str:
    """The entries of :func:`compare_runs` as a text table."""
    lines = [f"{'shape':10s} {'b':>3s} {'method':10s} {'keep':>4s}  {'run A tok/s [min-max]':>24s}  "
             f"{'run B tok/s [min-max]':>24s}  {'diff':>7s}  verdict (within {tolerance:.0%})"]
    for e in entries:
        shape, batch, method, keep = e["config"]
        flags = "".join(f" {name} slower than none" for name, r in (("A", e["a"]), ("B", e["b"]))
                        if r.get("decode_slower_than_baseline"))
        lines.append(f"{shape:10s} {batch:3d} {method:10s} {str(keep or '-'):>4s}  {_range(e['a'], '.1f'):>24s}  "
                     f"{_range(e['b'], '.1f'):>24s}  {_num(None if e['diff'] is None else 100 * e['diff'], '+6.1f')}%"
                     f"  {'PASS' if e['passed'] else 'FAIL'}{flags}")
    return "\n".join(lines)


def compare_files(path_a: str, path_b: str, tolerance: float = 0.10) -> int:
    """Print the decode comparison of two result files; 0 when every figure agrees within ``tolerance``."""
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    entries, ok = compare_runs(a, b, tolerance)
    print(f"A: {path_a} ({a.get('device')}, {a.get('date')}, timer {a.get('timer')})")
    print(f"B: {path_b} ({b.get('device')}, {b.get('date')}, timer {b.get('timer')})")
    print(comparison_table(entries, tolerance))
    passed = sum(e["passed"] for e in entries)
    print(f"{'PASS' if ok else 'FAIL'}: {passed}/{len(entries)} decode figures within {tolerance:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
