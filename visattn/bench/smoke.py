"""``visattn smoke``: every attention op on a real photo, checked against the dense float64 oracle.

The bundled photo (visattn/assets) is cut into 4×4 patches; fixed random projections turn the patches into
q/k/v for 1-D (rows of patches as a sequence), 2-D (the patch grid) and 3-D (four shifted crops as frames).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from visattn import functional
from visattn.bench import dense
from visattn.functional import last_backend

HEADS, HEAD_DIM, PATCH = 2, 16, 4


@dataclass
class Row:
    op: str
    shape: str
    backend: str
    error: float
    tolerance: float
    ms: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def load_photo() -> Tensor:
    """The bundled 96×96 RGB photo as a float tensor [96, 96, 3] in [0, 1]."""
    from PIL import Image

    with resources.files("visattn").joinpath("assets/astronaut_96.png").open("rb") as f:
        img = Image.open(f).convert("RGB")
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).float() / 255.0


def patch_tokens(photo: Tensor) -> Tensor:
    """[H/4, W/4, 48] patch vectors, normalised per channel."""
    h, w, c = photo.shape
    grid = photo.view(h // PATCH, PATCH, w // PATCH, PATCH, c).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(h // PATCH, w // PATCH, -1)
    return (grid - grid.mean((0, 1))) / (grid.std((0, 1)) + 1e-6)


def project(x: Tensor, seed: int, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed random q/k/v projections of [..., C] features to [1, ..., heads, head_dim] views of one qkv tensor."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(x.shape[-1], 3 * HEADS * HEAD_DIM, generator=gen) / x.shape[-1] ** 0.5
    qkv = (x @ weight).view(1, *x.shape[:-1], 3, HEADS, HEAD_DIM).to(device=device, dtype=dtype)
    return qkv.unbind(-3)  # strided views, as a fused qkv Linear gives them


def _time(fn: Callable[[], Tensor], device, repeats: int = 3) -> tuple[Tensor, float]:
    """Median of ``repeats`` timed runs after one warm-up run (compilation, autotune cache)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return out, sorted(times)[len(times) // 2]


def cases(tokens2d: Tensor, device, dtype):
    """(op key, case name, q, callable running visattn, callable running the oracle) for each smoke case.

    The op key is the canonical ``visattn.functional.OP_SPECS`` key; the oracle is that op's dense peer
    (``dense.PEERS``). Every spec has at least one case (tests/bench/test_op_specs.py checks it).
    """
    gen = torch.Generator().manual_seed(7)
    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(device=device, dtype=dtype)

    q2, k2, v2 = project(tokens2d, 0, device, dtype)
    q1, k1, v1 = project(tokens2d.reshape(-1, tokens2d.shape[-1])[:288], 1, device, dtype)
    frames = torch.stack([tokens2d[i : i + 20, i : i + 20] for i in range(4)])
    q3, k3, v3 = project(frames, 2, device, dtype)
    rpb7, rpb_win = rand(HEADS, 13, 13), rand(HEADS, 11, 11)
    extra_k, extra_v = rand(1, 3, HEADS, HEAD_DIM), rand(1, 3, HEADS, HEAD_DIM)
    agents = rand(1, 16, HEADS, HEAD_DIM)
    agent_bias, query_bias = rand(1, HEADS, 16, 576), rand(1, HEADS, 576, 16)
    def f64(*ts):
        return [None if t is None else t.double().cpu() for t in ts]

    yield ("na", "na1d causal k=15", q1, lambda: functional.na1d(q1, k1, v1, 15, is_causal=True),
           lambda: dense.PEERS["na"](*f64(q1, k1, v1), 15, is_causal=True))
    yield ("na", "na2d k=7 rpb", q2, lambda: functional.na2d(q2, k2, v2, 7, rpb=rpb7),
           lambda: dense.PEERS["na"](*f64(q2, k2, v2), 7, rpb=rpb7.double().cpu()))
    yield ("na", "na2d k=5 dil=3", q2, lambda: functional.na2d(q2, k2, v2, 5, dilation=3),
           lambda: dense.PEERS["na"](*f64(q2, k2, v2), 5, dilation=3))
    yield ("na", "na2d k=6 stride=3 (GNA)", q2, lambda: functional.na2d(q2, k2, v2, 6, stride=3),
           lambda: dense.PEERS["na"](*f64(q2, k2, v2), 6, stride=3))
    yield ("na", "na2d k=8 stride=8 (blocked)", q2, lambda: functional.na2d(q2, k2, v2, 8, stride=8),
           lambda: dense.PEERS["na"](*f64(q2, k2, v2), 8, stride=8))
    yield ("na", "na2d k=7 +3 global KV", q2,
           lambda: functional.na2d(q2, k2, v2, 7, additional_keys=extra_k, additional_values=extra_v),
           lambda: dense.PEERS["na"](*f64(q2, k2, v2), 7, additional_keys=extra_k.double().cpu(),
                                     additional_values=extra_v.double().cpu()))
    yield ("na", "na3d k=(3,5,5) causal-T", q3,
           lambda: functional.na3d(q3, k3, v3, (3, 5, 5), is_causal=(True, False, False)),
           lambda: dense.PEERS["na"](*f64(q3, k3, v3), (3, 5, 5), is_causal=(True, False, False)))
    yield ("window", "window 6x6 shift 3 rpb", q2, lambda: functional.window_attention(q2, k2, v2, 6, 3, rpb=rpb_win),
           lambda: dense.PEERS["window"](*f64(q2, k2, v2), (6, 6), (3, 3), *f64(rpb_win)))
    yield ("window", "window3d (2,4,4) shift (1,2,2)", q3,
           lambda: functional.window_attention(q3, k3, v3, (2, 4, 4), (1, 2, 2)),
           lambda: dense.PEERS["window"](*f64(q3, k3, v3), (2, 4, 4), (1, 2, 2)))
    yield ("agent", "agent 16 agents +biases", q2,
           lambda: functional.agent_attention(q2, k2, v2, agents, agent_bias, query_bias),
           lambda: dense.PEERS["agent"](*f64(q2, k2, v2, agents, agent_bias, query_bias)))
    rel_h, rel_w = rand(19, HEAD_DIM), rand(19, HEAD_DIM)
    yield ("halo", "halo block 6 halo 2 rel logits", q2,
           lambda: functional.halo_attention(q2, k2, v2, 6, 2, rel_h, rel_w),
           lambda: dense.PEERS["halo"](*f64(q2, k2, v2), (6, 6), (2, 2), *f64(rel_h, rel_w)))
    yield ("bilevel_routing", "BRA 5x5 regions top-4 (padded)", q2,
           lambda: functional.bilevel_routing_attention(q2, k2, v2, 5, 4),
           lambda: dense.PEERS["bilevel_routing"](*f64(q2, k2, v2), (5, 5), 4))
    yield ("sliding_tile", "STA tiles (2,4,4) window (1,3,3) +3 text", q3,
           lambda: functional.sliding_tile_attention(q3, k3, v3, (2, 4, 4), (1, 3, 3), additional_keys=extra_k,
                                                     additional_values=extra_v),
           lambda: dense.PEERS["sliding_tile"](*f64(q3, k3, v3), (2, 4, 4), (1, 3, 3), None, *f64(extra_k, extra_v)))
    yield ("radial", "radial block 16 decay 0.3 +3 text", q3,
           lambda: functional.radial_attention(q3, k3, v3, 16, 0.3, additional_keys=extra_k,
                                               additional_values=extra_v),
           lambda: dense.PEERS["radial"](*f64(q3, k3, v3), 16, 0.3, True, None, *f64(extra_k, extra_v)))
    yield ("vmoba", "VMoBA 3-D chunks (2,5,5) threshold 0.25", q3,
           lambda: functional.vmoba_attention(q3, k3, v3, (2, 5, 5)),
           lambda: dense.PEERS["vmoba"](*f64(q3, k3, v3), (2, 5, 5)))


def run_smoke(device: str | None = None, dtype: str = "auto", models: bool = True) -> list[Row]:
    """Every op on the photo vs the dense oracle, then (``models``) every registered model family through timm."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = {"auto": torch.float16 if dev.type == "cuda" else torch.float32, "fp32": torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tolerance = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dt]
    tokens2d = patch_tokens(load_photo())
    rows = []
    with torch.no_grad():
        for _key, op, q, run, oracle in cases(tokens2d, dev, dt):
            out, ms = _time(run, dev)
            backend = last_backend()
            err = dense.max_abs_error(out, oracle())
            shape = "x".join(str(s) for s in q.shape)
            rows.append(Row(op, shape, backend, err, tolerance, ms))
    if models:
        rows += model_rows(dev, dt)
    return rows


# One row per registered family: (row label, timm name, create kwargs, input side). Random init (seed 0), so nothing
# is downloaded; small inputs keep the CPU run short (the families run at any size their configs allow).
MODEL_CASES = (
    ("timm nat_mini", "nat_mini", {}, 224),
    ("timm dinat_mini", "dinat_mini", {}, 224),
    ("timm biformer_tiny", "biformer_tiny", {}, 112),
    ("timm agent_swin_t", "agent_swin_t", {"img_size": 96}, 96),
    ("timm agent_pvt_t", "agent_pvt_t", {"img_size": 96}, 96),
    ("timm agent_deit_t", "agent_deit_t", {"img_size": 96}, 96),
    ("timm swin_tiny (patch_swin)", "swin_tiny_patch4_window7_224", {"img_size": 96}, 96),
)
TOP5: dict[str, list[tuple[int, str]]] = {}  # row label -> top-5 (class index, ImageNet name), for format_table


def _photo_batch(size: int) -> Tensor:
    import torch.nn.functional as F
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    image = F.interpolate(load_photo().permute(2, 0, 1)[None], size=(size, size), mode="bicubic", align_corners=False)
    mean, std = (torch.tensor(stat).view(1, 3, 1, 1) for stat in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (image.clamp(0, 1) - mean) / std


def _force_reference(model: torch.nn.Module) -> None:
    """Every visattn attention module of ``model`` on the exact reference backend (the oracle copy)."""
    for module in model.modules():
        if isinstance(getattr(module, "backend", None), str):
            module.backend = "reference"


def _top5(logits: Tensor) -> list[tuple[int, str]]:
    try:
        from timm.data import ImageNetInfo

        names = ImageNetInfo()
        name = names.index_to_description
    except Exception:  # older timm: indices only
        name = lambda i: ""  # noqa: E731
    return [(int(i), name(int(i))) for i in logits[0].float().topk(5).indices]


def model_rows(device, dtype) -> list[Row]:
    """Every registered family created by name through timm (random init, seed 0, no download) on the photo.

    Oracle: a float64 copy of the same model with every visattn attention module forced to ``backend="reference"``
    (for ``patch_swin``: timm's own, unpatched Swin in float64); the error is the max abs difference of the logits.
    Each row also checks the logits are finite; the top-5 classes are printed under the table.
    """
    import contextlib
    import copy

    import timm

    from visattn import backends
    from visattn.models.swin_patch import patch_swin

    dev, dt = torch.device(device), dtype
    # Logits are O(1). Measured on an H100 with the reference NA path (rest of the model in dt, cuDNN TF32 convs):
    # fp32 2.4e-4, fp16 5.3e-4, bf16 4.8e-3; the bounds leave 4x/20x/10x for the attention kernels.
    tolerance = {torch.float32: 1e-3, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dt]
    rows = []
    with torch.no_grad():
        for label, name, kwargs, size in MODEL_CASES:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            oracle = copy.deepcopy(model).double()
            _force_reference(oracle)
            if name.startswith("swin_"):
                model = patch_swin(model)
            image = _photo_batch(size)
            model = model.to(device=dev, dtype=dt)
            x = image.to(device=dev, dtype=dt)
            # patch_swin keeps timm's own path for CPU tensors under "auto": force visattn's ops to check them
            forced = backends.use_backend("reference") if name.startswith("swin_") and dev.type != "cuda" else None
            with forced or contextlib.nullcontext():
                if dev.type == "cuda":  # warm-up + median of 3 (kernels compile on first use)
                    out, ms = _time(lambda model=model, x=x: model(x), dev)
                else:  # one run: whole models on a 2-core CPU dominate the smoke's time
                    start = time.perf_counter()
                    out = model(x)
                    ms = (time.perf_counter() - start) * 1e3
            backend = last_backend()
            err = dense.max_abs_error(out, oracle(image.double()))
            if not bool(torch.isfinite(out).all()):
                err = float("inf")
            TOP5[label] = _top5(out)
            rows.append(Row(f"{label} fwd", "x".join(str(s) for s in x.shape), backend, err, tolerance, ms))
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'op':34s} {'q shape':14s} {'backend':10s} {'max err':>9s} {'ms':>8s}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.op:34s} {r.shape:14s} {r.backend:10s} {r.error:9.2e} {r.ms:8.2f}  {'yes' if r.ok else 'NO'}")
    shown = [r.op[: -len(" fwd")] for r in rows if r.op.endswith(" fwd") and r.op[: -len(" fwd")] in TOP5]
    if shown:
        lines.append("")
        lines.append("top-5 classes on the photo (random init, so the classes mean nothing; the logits are finite):")
        for label in shown:
            lines.append(f"  {label:30s} " + ", ".join(f"{i} {n.split(',')[0]}".strip() for i, n in TOP5[label]))
    return "\n".join(lines)
