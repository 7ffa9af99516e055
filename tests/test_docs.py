"""Every Python code block of README.md and docs/*.md runs, so the docs cannot drift from the code.

One test case per ```python block, id ``FILE:LINE`` (the line of the opening fence). Conventions the docs follow:

* A fence always names its language. Only ``python`` blocks are code meant to run; shell commands are ``bash``,
  layouts and signatures ``text`` (test_every_fence_names_its_language keeps untagged fences from hiding code).
* A block runs on its own, in a fresh namespace, with ``torch.manual_seed(0)``. A name it uses without defining
  (a user's model, pipeline or input) must be described in one of the block's comments, for example
  ``# llava = LlavaForConditionalGeneration.from_pretrained(...)``, and is given by the test: GIVEN below builds
  a tiny, randomly initialised stand-in of that object (no network, CPU).
* Blocks that download official weights (``pretrained=True``) run inside tests/offline_hub.py's ``OfflineHub``:
  every name the block creates with ``pretrained=True`` is served as a synthetic checkpoint in its official layout
  through timm's real download path (``needs_offline_hub`` selects those blocks, ``pretrained_names`` the names).
* Blocks that need CUDA (``.cuda()``, ``device="cuda"``) carry the ``gpu`` marker; none does today, since every
  op runs on the CPU. None is ``slow`` either: the whole file takes about 25 s of CPU time.
"""

from __future__ import annotations

import ast
import builtins
import io
import os
import re
import subprocess
import sys
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")

@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (closed by the same fence; an indented fence's code is dedented)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = len(match.group(1)), match.group(2), match.group(3).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        blocks.append(Block(path, i + 1, lang, "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "python"]


def needs_offline_hub(block: Block) -> bool:
    return re.search(r"pretrained\s*=\s*True", block.code) is not None


def pretrained_names(block: Block) -> list[str]:
    """The model names a block creates with ``pretrained=True`` (``create_model("name", ..., pretrained=True)``)."""
    return re.findall(r"create_model\(\s*[\"']([^\"']+)[\"'][^)]*pretrained\s*=\s*True", block.code)


def needs_gpu(block: Block) -> bool:
    return re.search(r"\.cuda\(|device\s*=\s*[\"']cuda", block.code) is not None


# ------------------------------------------------------------------------------------------------ the given names
def free_names(code: str) -> set[str]:
    """Names the block reads but never binds (assignment, import, def, class, argument) and that are no builtins."""
    tree = ast.parse(code)
    bound, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound - set(dir(builtins))


def comments(code: str) -> str:
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return "\n".join(token.string for token in tokens if token.type == tokenize.COMMENT)


def _tiny_llava() -> torch.nn.Module:
    from tp_tiny import tiny_llava

    model = tiny_llava(image_size=168)  # 12 x 12 = 144 image tokens, so keep=64 prunes
    model.generation_config.max_new_tokens = 4  # the blocks' generate() calls stay short
    return model


def _llava_inputs() -> dict:
    from tp_tiny import batch, pixels, prompt

    ids, mask = batch([prompt(3, 144, 4, 0), prompt(5, 144, 2, 1)])  # batch 2, left padding
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2, 168))


def _tiny_qwen() -> torch.nn.Module:
    from tp_tiny import tiny_qwen2vl

    return tiny_qwen2vl(v25=True)  # Qwen2.5-VL: a windowed and a full-attention vision block


def _qwen_video_inputs() -> dict:
    import inspect

    from tp_tiny import QWEN_VEND, QWEN_VSTART
    from transformers import Qwen2_5_VLForConditionalGeneration

    t, h, w = 2, 8, 12  # 2 frames of 24 tokens; 4x4-patch windows: 4 full and 2 half windows per frame
    ids = torch.tensor([[11, 12, QWEN_VSTART] + [5] * (t * h * w // 4) + [QWEN_VEND, 13]])  # 5: the video token
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), video_grid_thw=torch.tensor([[t, h, w]]),
              pixel_values_videos=torch.randn(t * h * w, 3 * 2 * 4 * 4))
    if "mm_token_type_ids" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters:
        kw["mm_token_type_ids"] = (ids == 5).int() * 2  # 2 marks video tokens
    return kw


def _clip_vision() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=224, patch_size=14)  # 16 x 16 = 256 patches: r=16 per layer merges
    return CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").eval()


def _open_clip_tower() -> torch.nn.Module:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=3, width=64, head_width=32, patch_size=8, image_size=96)  # 144 patches
    return _build_vision_tower(16, cfg).eval()


class _NattenLayoutModule(torch.nn.Module):
    """NATTEN 0.21's NeighborhoodAttention2D parameters (``qkv = Linear(C, 3C)``, ``proj = Linear(C, C)``, read from
    natten/modules.py); used when NATTEN itself is not installed, for its state dict only."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.qkv = torch.nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = torch.nn.Linear(embed_dim, embed_dim)


def _natten_module() -> torch.nn.Module:
    try:
        import natten
    except ImportError:
        return _NattenLayoutModule(64)
    return natten.NeighborhoodAttention2D(64, 4, 7, 1, 2)


def _ltx2_decoder() -> torch.nn.Module:
    from diffusers.models.autoencoders.ltx2_diffusion_decoder import LTX2VideoDiffusionDecoderModel

    return LTX2VideoDiffusionDecoderModel(  # tests/diffusion/test_diffusion_ltx2.py's tiny configuration
        latent_channels=8, patch_size=2, decoder_head_dim=8, decoder_stage_channels=(64, 32, 16, 16, 8),
        decoder_stage_depths=(1, 1, 1, 1, 2), decoder_stage_kernels=((3, 3, 3), (3, 3, 5), (3, 5, 3), (3, 3, 3)),
        decoder_upsample_strides=((1, 1, 1), (2, 1, 1), (1, 1, 1), (1, 1, 1)), decoder_stage5_kernel=(3, 3, 5),
        decoder_t_emb_dim=32, spatial_compression_ratio=2, temporal_compression_ratio=2,
    ).eval()


class FluxPipelineStandIn:
    """Stands in for diffusers' ``FluxPipeline`` (a real one needs tokenizers and text encoders from the Hub).

    ``transformer`` is a real, tiny, random ``FluxTransformer2DModel``; calling the stand-in runs one denoising
    evaluation of it with the inputs FluxPipeline builds (packed latents, text embeddings, pooled projection, a
    timestep, row-major ``img_ids`` over the latent grid, zero ``txt_ids``) and returns the output as ``images``.
    """

    grid = (8, 8)

    def __init__(self):
        from diffusers import FluxTransformer2DModel

        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()

    def __call__(self, prompt: str) -> SimpleNamespace:
        height, width = self.grid
        text = len(prompt.split())
        ids = torch.zeros(height, width, 3)
        ids[..., 1] = torch.arange(height)[:, None]
        ids[..., 2] = torch.arange(width)[None, :]
        with torch.no_grad():
            out = self.transformer(hidden_states=torch.randn(1, height * width, 4),
                                   encoder_hidden_states=torch.randn(1, text, 16),
                                   pooled_projections=torch.randn(1, 8), timestep=torch.tensor([1.0]),
                                   img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3)).sample
        return SimpleNamespace(images=list(out))


def _sd_pipe() -> SimpleNamespace:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # tests/diffusion/test_diffusion_processors.py's tiny UNet
        sample_size=10, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, layers_per_block=1, attention_head_dim=8, norm_num_groups=8).eval()
    return SimpleNamespace(unet=unet)  # the block only patches pipe.unet


def _randn(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


# name -> builder of a tiny stand-in for what the block's comment describes
GIVEN: dict[str, Callable[[], object]] = {
    "llava": _tiny_llava,
    "model": _tiny_llava,  # docs/TOKENPRUNE.md's LLaVA
    "inputs": _llava_inputs,
    "qwen": _tiny_qwen,  # docs/TOKENPRUNE.md's Qwen2.5-VL
    "video_inputs": _qwen_video_inputs,
    "vision": _clip_vision,
    "pixel_values": _randn(2, 3, 224, 224),
    "visual": _open_clip_tower,
    "images": _randn(2, 3, 96, 96),
    "q": _randn(1, 16, 16, 4, 16),
    "k": _randn(1, 16, 16, 4, 16),
    "v": _randn(1, 16, 16, 4, 16),
    "natten_module": _natten_module,
    "decoder": _ltx2_decoder,
    "latents": _randn(1, 8, 3, 5, 7),
    "g": lambda: torch.Generator().manual_seed(0),
    "pipe": FluxPipelineStandIn,
    "sd_pipe": _sd_pipe,
    "prompt": lambda: "a watercolour fox in the snow",
    "x": _randn(1, 3, 9, 9, 1024),  # docs/DIFFUSION.md's video DiTBlock: T >= 3, H, W >= 9 for its 3x9x9 kernel
    "c": _randn(1, 1024),
    "text_tokens": _randn(1, 5, 4096),
    "text_mask": lambda: torch.tensor([[True, True, True, False, False]]),
}


def _params():
    params = []
    for block in PYTHON_BLOCKS:
        marks = []
        if needs_gpu(block):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


# ------------------------------------------------------------------------------------------------------- the tests
def test_every_fence_names_its_language():
    untagged = [block.id for block in ALL_BLOCKS if not block.lang]
    assert not untagged, f"code fences without a language (python, bash, text, ...): {untagged}"
    assert len(PYTHON_BLOCKS) >= 10, [block.id for block in PYTHON_BLOCKS]  # the parser found the docs' examples


def test_undefined_names_are_described_and_given():
    """A name a block uses without defining must be described in one of its comments and built by GIVEN."""
    problems = []
    for block in PYTHON_BLOCKS:
        notes = comments(block.code)
        for name in sorted(free_names(block.code)):
            if name not in GIVEN:
                problems.append(f"{block.id}: {name!r} is neither defined in the block nor in GIVEN")
            elif not re.search(rf"\b{re.escape(name)}\b", notes):
                problems.append(f"{block.id}: {name!r} is used but no comment of the block says what it is")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block: Block, tmp_path):
    if needs_offline_hub(block):
        from offline_hub import OfflineHub

        names = pretrained_names(block)
        assert names, f"{block.id}: pretrained=True but no create_model(\"name\", ..., pretrained=True) found"
        with OfflineHub(tmp_path) as hub:
            for name in names:
                hub.serve_registered(name)
            _run_block(block)
            assert len(hub.requests) >= len(names), hub.requests  # the weights came through the hub
        return
    _run_block(block)


def _run_block(block: Block) -> None:
    names = free_names(block.code)
    if names & {"decoder", "pipe", "sd_pipe"}:
        pytest.importorskip("diffusers")
    if names & {"llava", "model", "vision"}:
        pytest.importorskip("transformers")
    if "visual" in names or re.search(r"^\s*(import|from) open_clip\b", block.code, re.M):
        pytest.importorskip("open_clip")  # the vlm / test extras
    torch.manual_seed(0)
    namespace = {"__name__": "__doc_block__", **{name: GIVEN[name]() for name in sorted(names)}}
    # leading newlines: tracebacks point at the Markdown file's own line numbers
    code = compile("\n" * block.line + block.code, block.id, "exec")
    exec(code, namespace)  # noqa: S102 - the docs' own examples


def test_subpackages_are_lazy_attributes():
    """``visattn.diffusion`` / ``visattn.tokenprune`` / ... work after a bare ``import visattn`` (as the README writes
    them), and ``import visattn`` stays light: it imports neither diffusers nor transformers."""
    script = textwrap.dedent("""
        import sys
        import visattn
        heavy = [name for name in ("diffusers", "transformers") if name in sys.modules]
        assert not heavy, heavy
        for name in ("diffusion", "tokenprune", "models", "nn", "bench", "kernels", "backends", "reference"):
            assert name in dir(visattn), name
        assert visattn.diffusion.DiTBlock.__module__ == "visattn.diffusion.blocks"
        assert callable(visattn.tokenprune.apply)
        assert visattn.nn.WindowAttention is sys.modules["visattn.nn.window"].WindowAttention
        assert visattn.models is sys.modules["visattn.models"]
        assert visattn.bench.__name__ == "visattn.bench"
        try:
            visattn.no_such_thing
        except AttributeError as error:
            assert "no_such_thing" in str(error)
        else:
            raise AssertionError("an unknown attribute must raise AttributeError")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]



# signatures written in the prose: `Name(param, param=default, *, keyword=default)` spans, checked against the code
DOCUMENTED_CALLABLES = {
    "NeighborhoodAttention1D/2D/3D": "visattn.nn:NeighborhoodAttention2D",
    "NeighborhoodAttention2D": "visattn.nn:NeighborhoodAttention2D",
    "NeighborhoodAttention1d/2d/3d": "visattn.nn:NeighborhoodAttention2d",
    "NeighborhoodAttention2d": "visattn.nn:NeighborhoodAttention2d",
    "WindowAttention": "visattn.nn:WindowAttention",
    "AgentAttention": "visattn.nn:AgentAttention",
    "BiLevelRoutingAttention": "visattn.nn:BiLevelRoutingAttention",
    "DiTBlock": "visattn.diffusion:DiTBlock",
    "HDiTBlock": "visattn.diffusion:HDiTBlock",
    "sample_euler": "visattn.diffusion:sample_euler",
    "window_attention": "visattn:window_attention",
    "agent_attention": "visattn:agent_attention",
    "bilevel_routing_attention": "visattn:bilevel_routing_attention",
    "patch_timm": "visattn.models:patch_timm",
}
SPAN = re.compile(r"`(" + "|".join(re.escape(name) for name in DOCUMENTED_CALLABLES) + r")\(([^`]*)\)`")


def _resolve(target: str):
    import importlib
    import inspect

    module, name = target.split(":")
    return inspect.signature(getattr(importlib.import_module(module), name))


def documented_spans() -> list[tuple[str, str, str]]:
    """(where, name, argument text) for every backticked ``Name(...)`` span of a DOCUMENTED_CALLABLES name."""
    spans = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for match in SPAN.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            spans.append((where, match.group(1), " ".join(match.group(2).split())))
    return spans


def test_documented_signatures_and_calls_match_the_code():
    """A span that reads as a signature must equal the code's: names, order, defaults, keyword-only (a trailing
    ``...`` means more parameters follow: the written ones must be the code's first ones; a bare list of names is
    the positional order). A span that reads as a call (``NeighborhoodAttention2D(64, 4, 7, 2)``) must bind."""
    import inspect

    problems, signatures = [], 0
    for where, name, args in documented_spans():
        signature = _resolve(DOCUMENTED_CALLABLES[name])
        partial = args.endswith("...")
        written = args[:-3].rstrip().rstrip(",") if partial else args
        try:
            documented = ast.parse(f"def f({written}): pass").body[0].args
        except SyntaxError:
            try:
                call = ast.parse(f"f({args})", mode="eval").body
                signature.bind(*[ast.literal_eval(a) for a in call.args],
                               **{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
            except (SyntaxError, ValueError, TypeError) as error:
                problems.append(f"{where}: {name}({args}) is neither the code's signature nor a call that binds "
                                f"to it {signature}: {error}")
            continue
        signatures += 1
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        positional = [a.arg for a in documented.posonlyargs + documented.args]
        keyword_only = [a.arg for a in documented.kwonlyargs]
        want_positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        want_keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        names_only = not (documented.defaults or documented.kwonlyargs or documented.vararg or documented.kwarg)
        if partial:
            ok = positional == want_positional[:len(positional)] and set(keyword_only) <= set(want_keyword_only)
        else:
            ok = positional == want_positional and (names_only or keyword_only == want_keyword_only)
        if not ok:
            problems.append(f"{where}: {name}({args}) does not match the code's {signature}")
            continue
        if names_only:
            continue
        defaults = dict(zip(positional[len(positional) - len(documented.defaults):], documented.defaults,
                            strict=True))
        defaults.update({a.arg: d for a, d in zip(documented.kwonlyargs, documented.kw_defaults, strict=True) if d})
        for param in params:
            if param.name not in positional + keyword_only:
                continue
            has_default = param.default is not inspect.Parameter.empty
            if (param.name in defaults) != has_default or (
                    has_default and ast.literal_eval(defaults[param.name]) != param.default):
                problems.append(f"{where}: {name}: the code's default of {param.name} is {param.default!r}")
    assert signatures >= 7, signatures  # the docs' signatures were found
    assert not problems, "\n".join(problems)
