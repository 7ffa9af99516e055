"""An offline model hub: ``pretrained=True`` runs through timm's real download and cache code against a local
HTTP server on 127.0.0.1 serving synthetic checkpoints in each family's official layout. Nothing is mocked in timm,
torch.hub or huggingface_hub; only where requests go is changed, and any request the hub was not given a file for
gets a 404 (so a test can never reach the network).

API::

    from offline_hub import OfflineHub, official_checkpoint, offline_hub   # tests/ is on pytest's pythonpath

    with OfflineHub(tmp_path) as hub:                  # or the ``offline_hub`` fixture (function scope)
        hub.serve_registered("agent_swin_t.in1k")      # full size; or ("agent_swin_t", depths=(1, 1, 1, 1), ...)
        model = timm.create_model("agent_swin_t", pretrained=True)
        hub.requests                                   # [(method, original URL), ...] in arrival order

- ``OfflineHub(root)``: a context manager. On entry it starts the server, routes urllib (torch.hub's
  ``download_url_to_file``, which timm's URL weights use) to it with an installed ``urllib`` opener, points
  ``torch.hub``'s directory (timm's checkpoint cache) to ``root/torch_hub`` and huggingface_hub's endpoint and cache
  to the server and ``root/hf_hub``; on exit it restores all of them. ``hub.env()`` gives the same routing as
  environment variables for a child process or a conftest that runs before huggingface_hub is imported
  (``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``TORCH_HOME``); URL downloads in a child still need ``hub.install_opener()``.
- ``hub.serve_url(url, payload)`` / ``hub.serve_hf(repo_id, filename, payload)``: a file at a URL or in a Hugging
  Face repo (``payload``: bytes, a state dict to ``torch.save``, or a zero-argument callable returning either,
  called on the first request).
- ``hub.serve_registered(name, **model_kwargs)``: the file timm will ask for when ``name`` ("variant" or
  "variant.tag") is created with ``pretrained=True`` and ``model_kwargs``: its registered URL, or its hub repo's
  ``pytorch_model.bin`` (``model.safetensors`` answers "entry not found", as for the shi-labs repos), holding
  :func:`official_checkpoint`. Returns the URL or repo id.
- ``official_checkpoint(name, seed=0, **model_kwargs)``: a random state dict (float32, BatchNorm variances
  positive) in the official layout of ``name``'s family, sized for the model ``timm.create_model(name,
  **model_kwargs)`` builds; wrapped as the official releases are (``{"model": ...}`` for Agent-* and BiFormer, a bare
  transformers state dict for NAT/DiNAT).
- The ``*_official_shapes`` functions: key -> shape of each family's official model, written from the official
  sources (see each docstring); the family tests use them too.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import torch

_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the revision every served repo reports


# ----------------------------------------------------------------------------------------------- official layouts
def agent_swin_official_shapes(embed_dim, depths, heads, attn_type, agent_num=(9, 16, 49, 49), img_size=224,
                               num_classes=1000):
    """Key -> shape of the official AgentSwinTransformer(...).state_dict() (LeapLabTHU/Agent-Attention
    agent_swin.py): PatchEmbed(proj, norm); layers[i].blocks[j] = norm1, attn (AgentAttention: qkv, proj, dwc,
    an/na_bias [h, A, 7, 7], ah [1,h,A,H,1], aw [1,h,A,1,W], ha [1,h,H,1,A], wa [1,h,1,W,A]; or WindowAttention:
    relative_position_bias_table, relative_position_index buffer, qkv, proj), attn_mask buffer when shifted, norm2,
    mlp.fc1/fc2; layers[i].downsample (PatchMerging: reduction, norm) for i < 3; norm; head."""
    from visattn.models.agent import parse_attn_types

    shapes = {"patch_embed.proj.weight": (embed_dim, 3, 4, 4), "patch_embed.proj.bias": (embed_dim,),
              "patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,)}
    window = img_size // 4
    types = parse_attn_types(attn_type, depths)
    for i, depth in enumerate(depths):
        d, h, res, agents = embed_dim * 2**i, heads[i], img_size // 4 // 2**i, agent_num[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            for n in ("norm1", "norm2"):
                shapes[f"{p}.{n}.weight"] = shapes[f"{p}.{n}.bias"] = (d,)
            shapes.update({f"{p}.attn.qkv.weight": (3 * d, d), f"{p}.attn.qkv.bias": (3 * d,),
                           f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
                           f"{p}.mlp.fc1.weight": (4 * d, d), f"{p}.mlp.fc1.bias": (4 * d,),
                           f"{p}.mlp.fc2.weight": (d, 4 * d), f"{p}.mlp.fc2.bias": (d,)})
            if types[i][j] == "A":
                shapes.update({f"{p}.attn.dwc.weight": (d, 1, 3, 3), f"{p}.attn.dwc.bias": (d,),
                               f"{p}.attn.an_bias": (h, agents, 7, 7), f"{p}.attn.na_bias": (h, agents, 7, 7),
                               f"{p}.attn.ah_bias": (1, h, agents, res, 1),
                               f"{p}.attn.aw_bias": (1, h, agents, 1, res),
                               f"{p}.attn.ha_bias": (1, h, res, 1, agents),
                               f"{p}.attn.wa_bias": (1, h, 1, res, agents)})
            else:
                win = min(max(7, window // 8), res)
                shift = 0 if (j % 2 == 0 or res <= max(7, window // 8)) else win // 2
                shapes[f"{p}.attn.relative_position_bias_table"] = ((2 * win - 1) ** 2, h)
                shapes[f"{p}.attn.relative_position_index"] = (win * win, win * win)
                if shift:
                    shapes[f"{p}.attn_mask"] = ((res // win) ** 2, win * win, win * win)
        if i < len(depths) - 1:
            shapes[f"layers.{i}.downsample.reduction.weight"] = (2 * d, 4 * d)
            shapes[f"layers.{i}.downsample.norm.weight"] = shapes[f"layers.{i}.downsample.norm.bias"] = (4 * d,)
    final = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({"norm.weight": (final,), "norm.bias": (final,), "head.weight": (num_classes, final),
                   "head.bias": (num_classes,)})
    return shapes


def biformer_official_shapes(depths, dims, mlp_ratio=3, topks=(1, 4, 16, -2), head_dim=32, num_classes=1000):
    """Key -> shape of the official BiFormer(...).state_dict() (rayleizhu/BiFormer), written from the official
    module definitions: downsample_layers[0] = Sequential(Conv, BN, GELU, Conv, BN); downsample_layers[i] =
    Sequential(Conv, BN); Block = pos_embed (dw 3x3), norm1, attn, norm2, mlp = Sequential(Linear, Identity, GELU,
    Linear); BRA attn = qkv (QKVLinear: .qkv Linear dim -> 2*qk+dim), wo, lepe (dw 5x5); topk -2: AttentionLePE =
    qkv (no bias), proj, lepe; final BatchNorm2d norm; head."""
    shapes = {}

    def conv(prefix, cout, cin, k, groups=1):
        shapes[f"{prefix}.weight"] = (cout, cin // groups, k, k)
        shapes[f"{prefix}.bias"] = (cout,)

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def layer_norm(prefix, c):
        shapes[f"{prefix}.weight"] = shapes[f"{prefix}.bias"] = (c,)

    def linear(prefix, cout, cin, bias=True):
        shapes[f"{prefix}.weight"] = (cout, cin)
        if bias:
            shapes[f"{prefix}.bias"] = (cout,)

    conv("downsample_layers.0.0", dims[0] // 2, 3, 3)
    bn("downsample_layers.0.1", dims[0] // 2)
    conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
    bn("downsample_layers.0.4", dims[0])
    for i in range(1, 4):
        conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
        bn(f"downsample_layers.{i}.1", dims[i])
    for i, depth in enumerate(depths):
        d = dims[i]
        for j in range(depth):
            p = f"stages.{i}.{j}"
            conv(f"{p}.pos_embed", d, d, 3, groups=d)
            layer_norm(f"{p}.norm1", d)
            if topks[i] > 0:
                linear(f"{p}.attn.qkv.qkv", 3 * d, d)
                linear(f"{p}.attn.wo", d, d)
            else:
                linear(f"{p}.attn.qkv", 3 * d, d, bias=False)
                linear(f"{p}.attn.proj", d, d)
            conv(f"{p}.attn.lepe", d, d, 5, groups=d)
            layer_norm(f"{p}.norm2", d)
            linear(f"{p}.mlp.0", mlp_ratio * d, d)
            linear(f"{p}.mlp.3", d, mlp_ratio * d)
    bn("norm", dims[-1])
    linear("head", num_classes, dims[-1])
    return shapes


def agent_pvt_official_shapes(embed_dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                              depths=(2, 2, 2, 2), agent_num=(9, 16, 49, 49), attn_type="AAAA",
                              sr_ratios=(8, 4, 2, 1), agent_sr_ratios="1111", img_size=224, num_classes=1000):
    """Key -> shape of the official PyramidVisionTransformer(...).state_dict() (Agent-Attention agent_pvt.py): per
    stage i ``patch_embed{i+1}`` (proj conv k=s=4 then 2, norm), ``pos_embed{i+1}`` [1, N_i, C_i], ``block{i+1}.j`` =
    norm1, attn, norm2, mlp.fc1/fc2; AgentAttention: q, kv, proj, sr + norm when its sr > 1, dwc, an/na_bias
    [h, A, 7, 7], ah [1, h, A, H/sr, 1], aw [1, h, A, 1, W/sr], ha [1, h, H, 1, A], wa [1, h, 1, W, A];
    Attention ('B'): q, kv, proj, sr + norm when sr > 1; no final norm; head."""
    shapes = {}
    for i, depth in enumerate(depths):
        c, h, a = embed_dims[i], heads[i], agent_num[i]
        cin, patch = (embed_dims[i - 1], 2) if i else (3, 4)
        res = img_size // 4 // 2**i
        sr = int(agent_sr_ratios[i]) if attn_type[i] == "A" else sr_ratios[i]
        shapes.update({f"patch_embed{i + 1}.proj.weight": (c, cin, patch, patch), f"patch_embed{i + 1}.proj.bias": (c,),
                       f"patch_embed{i + 1}.norm.weight": (c,), f"patch_embed{i + 1}.norm.bias": (c,),
                       f"pos_embed{i + 1}": (1, res * res, c)})
        hidden = int(c * mlp_ratios[i])
        for j in range(depth):
            p = f"block{i + 1}.{j}"
            shapes.update({f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,), f"{p}.norm2.weight": (c,),
                           f"{p}.norm2.bias": (c,), f"{p}.attn.q.weight": (c, c), f"{p}.attn.q.bias": (c,),
                           f"{p}.attn.kv.weight": (2 * c, c), f"{p}.attn.kv.bias": (2 * c,),
                           f"{p}.attn.proj.weight": (c, c), f"{p}.attn.proj.bias": (c,),
                           f"{p}.mlp.fc1.weight": (hidden, c), f"{p}.mlp.fc1.bias": (hidden,),
                           f"{p}.mlp.fc2.weight": (c, hidden), f"{p}.mlp.fc2.bias": (c,)})
            if sr > 1:
                shapes.update({f"{p}.attn.sr.weight": (c, c, sr, sr), f"{p}.attn.sr.bias": (c,),
                               f"{p}.attn.norm.weight": (c,), f"{p}.attn.norm.bias": (c,)})
            if attn_type[i] == "A":
                shapes.update({f"{p}.attn.dwc.weight": (c, 1, 3, 3), f"{p}.attn.dwc.bias": (c,),
                               f"{p}.attn.an_bias": (h, a, 7, 7), f"{p}.attn.na_bias": (h, a, 7, 7),
                               f"{p}.attn.ah_bias": (1, h, a, res // sr, 1),
                               f"{p}.attn.aw_bias": (1, h, a, 1, res // sr),
                               f"{p}.attn.ha_bias": (1, h, res, 1, a), f"{p}.attn.wa_bias": (1, h, 1, res, a)})
    shapes.update({"head.weight": (num_classes, embed_dims[-1]), "head.bias": (num_classes,)})
    return shapes


def agent_deit_official_shapes(dim, heads, agents, agent_layer, depth=12, patch=16, img_size=224, num_classes=1000):
    """Key -> shape of the official VisionTransformer(...).state_dict() (Agent-Attention agent_deit.py):
    patch_embed.proj (timm PatchEmbed, no norm), cls_token [1, 1, C], pos_embed [1, 1 + N, C]; blocks.i (AgentBlock
    for i < agent_layer: norm1, attn = qkv, proj, dwc, an/na_bias [h, A, 7, 7], ah [1, h, A, n, 1], aw [1, h, A, 1,
    n], ha [1, h, n, 1, A], wa [1, h, 1, n, A], ac [1, h, A, 1], ca [1, h, 1, A]; else deit.py's Block: norm1,
    attn.qkv, attn.proj), norm2, mlp.fc1/fc2; norm; head (pre_logits is an Identity)."""
    n = img_size // patch
    shapes = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "cls_token": (1, 1, dim), "pos_embed": (1, 1 + n * n, dim), "norm.weight": (dim,), "norm.bias": (dim,),
              "head.weight": (num_classes, dim), "head.bias": (num_classes,)}
    for i in range(depth):
        p = f"blocks.{i}"
        shapes.update({f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,), f"{p}.norm2.weight": (dim,),
                       f"{p}.norm2.bias": (dim,), f"{p}.attn.qkv.weight": (3 * dim, dim),
                       f"{p}.attn.qkv.bias": (3 * dim,), f"{p}.attn.proj.weight": (dim, dim),
                       f"{p}.attn.proj.bias": (dim,), f"{p}.mlp.fc1.weight": (4 * dim, dim),
                       f"{p}.mlp.fc1.bias": (4 * dim,), f"{p}.mlp.fc2.weight": (dim, 4 * dim),
                       f"{p}.mlp.fc2.bias": (dim,)})
        if i < agent_layer:
            shapes.update({f"{p}.attn.dwc.weight": (dim, 1, 3, 3), f"{p}.attn.dwc.bias": (dim,),
                           f"{p}.attn.an_bias": (heads, agents, 7, 7), f"{p}.attn.na_bias": (heads, agents, 7, 7),
                           f"{p}.attn.ah_bias": (1, heads, agents, n, 1), f"{p}.attn.aw_bias": (1, heads, agents, 1, n),
                           f"{p}.attn.ha_bias": (1, heads, n, 1, agents), f"{p}.attn.wa_bias": (1, heads, 1, n, agents),
                           f"{p}.attn.ac_bias": (1, heads, agents, 1), f"{p}.attn.ca_bias": (1, heads, 1, agents)})
    return shapes


def nat_transformers_shapes(embed_dim, depths, heads, mlp_ratio, kernel_size, layer_scale=False, num_classes=1000,
                            prefix="nat"):
    """Key -> shape of transformers' ``NatForImageClassification`` / ``DinatForImageClassification`` state dict
    (``prefix`` "nat" / "dinat"; modeling_nat.py / modeling_dinat.py, the layout of the shi-labs hub repos):
    embeddings.patch_embeddings.projection = Sequential(Conv 3x3 s2, Conv 3x3 s2), embeddings.norm;
    encoder.levels[i].layers[j] = layernorm_before, attention.self (query, key, value, rpb [h, 2k-1, 2k-1]),
    attention.output.dense, layernorm_after, intermediate.dense, output.dense, layer_scale_parameters [2, C] when
    layer scale is on; encoder.levels[i].downsample (Conv 3x3 s2 no bias ``reduction``, ``norm``) for i < 3;
    layernorm; classifier."""
    half = embed_dim // 2
    shapes = {f"{prefix}.embeddings.patch_embeddings.projection.0.weight": (half, 3, 3, 3),
              f"{prefix}.embeddings.patch_embeddings.projection.0.bias": (half,),
              f"{prefix}.embeddings.patch_embeddings.projection.1.weight": (embed_dim, half, 3, 3),
              f"{prefix}.embeddings.patch_embeddings.projection.1.bias": (embed_dim,),
              f"{prefix}.embeddings.norm.weight": (embed_dim,), f"{prefix}.embeddings.norm.bias": (embed_dim,)}
    for i, depth in enumerate(depths):
        d, hidden = embed_dim * 2**i, int(embed_dim * 2**i * mlp_ratio)
        for j in range(depth):
            p = f"{prefix}.encoder.levels.{i}.layers.{j}"
            for n in ("layernorm_before", "layernorm_after"):
                shapes[f"{p}.{n}.weight"] = shapes[f"{p}.{n}.bias"] = (d,)
            for n in ("query", "key", "value"):
                shapes[f"{p}.attention.self.{n}.weight"], shapes[f"{p}.attention.self.{n}.bias"] = (d, d), (d,)
            shapes.update({f"{p}.attention.self.rpb": (heads[i], 2 * kernel_size - 1, 2 * kernel_size - 1),
                           f"{p}.attention.output.dense.weight": (d, d), f"{p}.attention.output.dense.bias": (d,),
                           f"{p}.intermediate.dense.weight": (hidden, d), f"{p}.intermediate.dense.bias": (hidden,),
                           f"{p}.output.dense.weight": (d, hidden), f"{p}.output.dense.bias": (d,)})
            if layer_scale:
                shapes[f"{p}.layer_scale_parameters"] = (2, d)
        if i < len(depths) - 1:
            p = f"{prefix}.encoder.levels.{i}.downsample"
            shapes.update({f"{p}.reduction.weight": (2 * d, d, 3, 3), f"{p}.norm.weight": (2 * d,),
                           f"{p}.norm.bias": (2 * d,)})
    final = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({f"{prefix}.layernorm.weight": (final,), f"{prefix}.layernorm.bias": (final,),
                   "classifier.weight": (num_classes, final), "classifier.bias": (num_classes,)})
    return shapes


def random_state(shapes: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random tensors of the given shapes (BatchNorm counters 7, variances in [0.5, 1.5)), reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = (torch.rand(shape, generator=gen) + 0.5).to(dtype)
        elif key.endswith("relative_position_index"):
            out[key] = torch.zeros(shape, dtype=torch.long)
        else:
            out[key] = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    return out


def _official_shapes(name: str, model_kwargs: dict) -> tuple[dict, str]:
    """The official layout's shapes for the model ``name`` builds with ``model_kwargs`` (its configuration read
    from a copy built on the meta device), and how the release wraps it ("model" or "")."""
    import timm

    model = timm.create_model(name.split(".")[0], pretrained=False, device="meta", **model_kwargs)
    module = type(model).__module__.rsplit(".", 1)[-1]
    classes = model.num_classes
    if module == "nat":
        stages = list(model.levels)
        layer_scale = stages[0].blocks[0].gamma1 is not None
        mlp_ratio = stages[0].blocks[0].mlp.fc1.out_features / stages[0].blocks[0].mlp.fc1.in_features
        family = "dinat" if any(b.attn.dilation[0] > 1 for s in stages for b in s.blocks) else "nat"
        return nat_transformers_shapes(model.patch_embed.proj[1].out_channels, [len(s.blocks) for s in stages],
                                       [s.blocks[0].attn.num_heads for s in stages], mlp_ratio,
                                       stages[0].blocks[0].attn.kernel_size[0], layer_scale, classes, family), ""
    if module == "biformer":
        stages = list(model.stages)
        first = stages[0].blocks[0]
        topks = [s.blocks[0].attn.topk if hasattr(s.blocks[0].attn, "topk") else -2 for s in stages]
        return biformer_official_shapes([len(s.blocks) for s in stages], [s.blocks[0].norm1.normalized_shape[0]
                                        for s in stages], first.mlp.fc1.out_features // first.mlp.fc1.in_features,
                                        topks, first.attn.qk_dim // first.attn.num_heads, classes), "model"
    if module == "agent":
        stages = list(model.layers)
        letters, tail = "", ""
        for stage in stages:
            kinds = ["A" if hasattr(b.attn, "agent_num") else "B" for b in stage.blocks]
            if len(set(kinds)) == 1:
                letters += kinds[0]
            else:
                letters, tail = letters + "M", str(kinds.count("A"))
        agents = [next((b.attn.agent_num for b in s.blocks if hasattr(b.attn, "agent_num")), 49) for s in stages]
        return agent_swin_official_shapes(model.patch_embed.proj.out_channels, [len(s.blocks) for s in stages],
                                          [s.blocks[0].attn.num_heads for s in stages], letters + tail, agents,
                                          model.img_size[0], classes), "model"
    if module == "agent_pvt":
        stages = list(model.stages)
        types = "".join("A" if hasattr(s.blocks[0].attn, "agent_num") else "B" for s in stages)
        srs = [s.blocks[0].attn.sr_ratio for s in stages]
        return agent_pvt_official_shapes(
            [s.patch_embed.proj.out_channels for s in stages], [s.blocks[0].attn.num_heads for s in stages],
            [s.blocks[0].mlp.fc1.out_features / s.blocks[0].mlp.fc1.in_features for s in stages],
            [len(s.blocks) for s in stages], [getattr(s.blocks[0].attn, "agent_num", 49) for s in stages], types,
            srs, "".join(str(r) for r in srs), model.img_size[0], classes), "model"
    if module == "agent_deit":
        blocks = list(model.blocks)
        agent_layer = sum(hasattr(b.attn, "agent_num") for b in blocks)
        return agent_deit_official_shapes(model.embed_dim, blocks[0].attn.num_heads, blocks[0].attn.agent_num,
                                          agent_layer, len(blocks), model.patch_embed.proj.kernel_size[0],
                                          model.img_size[0], classes), "model"
    raise ValueError(f"no official layout known for {name} (module {module})")


def official_checkpoint(name: str, seed: int = 0, **model_kwargs) -> dict:
    """A random checkpoint in the official layout of ``name``'s family, sized for ``timm.create_model(name,
    **model_kwargs)``, wrapped as released (see the module docstring)."""
    shapes, wrapper = _official_shapes(name, model_kwargs)
    state = random_state(shapes, seed)
    return {wrapper: state, "epoch": 300} if wrapper else state


# ----------------------------------------------------------------------------------------------- the server
def _as_bytes(payload) -> bytes:
    if callable(payload):
        payload = payload()
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    hub: OfflineHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        method = "GET" if body else "HEAD"
        found, headers = self.hub._lookup(self.path, method)
        if found is None:
            self.send_response(404)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(found)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(found)


class _Reroute(urllib.request.BaseHandler):
    """urllib pre-processor: every http(s) URL not on the hub's own address is rewritten to ``/url/<scheme>/...``
    on it (``OpenerDirector`` re-reads the scheme after pre-processing, so https becomes plain http)."""

    handler_order = 100

    def __init__(self, base: str):
        self.base = base

    def _reroute(self, request):
        if not request.full_url.startswith(self.base):
            parts = urlsplit(request.full_url)
            query = f"?{parts.query}" if parts.query else ""
            request.full_url = f"{self.base}/url/{parts.scheme}/{parts.netloc}{quote(parts.path)}{query}"
        return request

    http_request = https_request = _reroute


class OfflineHub:
    """See the module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        self._urls: dict[str, object] = {}
        self._hf: dict[tuple[str, str], object] = {}
        self._bytes: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._saved: list[Callable[[], None]] = []

    # --- what is served
    def serve_url(self, url: str, payload) -> None:
        self._urls[url] = payload

    def serve_hf(self, repo_id: str, filename: str, payload) -> None:
        self._hf[(repo_id, filename)] = payload

    def serve_registered(self, name: str, **model_kwargs) -> str:
        import timm

        variant = name.split(".")[0]
        cfg = timm.models.get_pretrained_cfg(name if "." in name else variant)
        if cfg is None:
            raise ValueError(f"{name} has no pretrained cfg")

        def payload():
            return official_checkpoint(name, **model_kwargs)

        if cfg.hf_hub_id:
            self.serve_hf(cfg.hf_hub_id, "pytorch_model.bin", payload)
            return cfg.hf_hub_id
        url = cfg.url[0] if isinstance(cfg.url, (tuple, list)) else cfg.url
        self.serve_url(url, payload)
        return url

    # --- routing
    @property
    def base(self) -> str:
        assert self._server is not None, "use OfflineHub as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment variables giving a fresh process the same huggingface_hub and torch.hub routing."""
        return {"HF_ENDPOINT": f"{self.base}/hf", "HF_HUB_CACHE": str(self.root / "hf_hub"),
                "TORCH_HOME": str(self.root / "torch_home"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def install_opener(self) -> None:
        """Route urllib (torch.hub downloads) to the hub (undone on exit when called inside ``with``)."""
        urllib.request.install_opener(urllib.request.build_opener(_Reroute(self.base)))

    def _lookup(self, path: str, method: str) -> tuple[bytes | None, dict]:
        if path.startswith("/url/"):
            scheme, rest = path[len("/url/"):].split("/", 1)
            host_path, _, query = rest.partition("?")
            url = f"{scheme}://{unquote(host_path)}" + (f"?{query}" if query else "")
            with self._lock:
                self.requests.append((method, url))
            return self._payload(self._urls.get(url)), {}
        match = re.match(r"^/hf/(.+?)/resolve/([^/]+)/(.+)$", path)
        if match:
            repo_id, _, filename = match[1], match[2], unquote(match[3])
            with self._lock:
                self.requests.append((method, f"hf://{repo_id}/{filename}"))
            data = self._payload(self._hf.get((repo_id, filename)))
            if data is None:
                known = any(repo == repo_id for repo, _ in self._hf)
                return None, {"X-Error-Code": "EntryNotFound" if known else "RepoNotFound",
                              "X-Error-Message": f"{filename} not served for {repo_id}"}
            etag = hashlib.sha256(data).hexdigest()
            return data, {"X-Repo-Commit": _COMMIT, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                          "X-Linked-Size": str(len(data))}
        with self._lock:
            self.requests.append((method, path))
        return None, {}

    def _payload(self, payload) -> bytes | None:
        if payload is None:
            return None
        with self._lock:
            if id(payload) not in self._bytes:
                self._bytes[id(payload)] = _as_bytes(payload)
            return self._bytes[id(payload)]

    # --- lifetime
    def __enter__(self) -> OfflineHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._route()
        return self

    def _route(self) -> None:
        old_opener, old_hub_dir = urllib.request._opener, torch.hub._hub_dir
        self.install_opener()
        torch.hub.set_dir(str(self.root / "torch_hub"))
        self._saved.append(lambda: (urllib.request.install_opener(old_opener), setattr(torch.hub, "_hub_dir",
                                                                                         old_hub_dir)))
        try:
            from huggingface_hub import constants
        except ImportError:
            return
        template = f"{self.base}/hf" + "/{repo_id}/resolve/{revision}/{filename}"
        new = dict(ENDPOINT=f"{self.base}/hf", HUGGINGFACE_CO_URL_TEMPLATE=template,
                   HF_HUB_CACHE=str(self.root / "hf_hub"), HF_HUB_OFFLINE=False)
        old = {k: getattr(constants, k) for k in new if hasattr(constants, k)}
        for key, value in new.items():
            setattr(constants, key, value)
        self._saved.append(lambda: [setattr(constants, k, v) for k, v in old.items()])

    def __exit__(self, *exc) -> None:
        while self._saved:
            self._saved.pop()()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def offline_hub(tmp_path):
    """An :class:`OfflineHub` rooted in ``tmp_path`` for one test."""
    with OfflineHub(tmp_path) as hub:
        yield hub
