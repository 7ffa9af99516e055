"""Saved float64 fixtures of tiny NAT / DiNAT / BiFormer models: the state dict, an input, the output and the
``forward_intermediates`` maps of one tiny configuration of every registered ``nat_*`` / ``dinat_*`` /
``biformer_*`` entrypoint, written once (before the families' attention moved onto ``visattn.nn``) and read by
``test_models_fixtures.py``: any later change to these models' keys, shapes or arithmetic fails it.

Regenerate only on purpose (a deliberate change of the models' numbers), from the repository root:

    PYTHONPATH=$PWD python tests/models/model_fixtures.py

Each file ``fixtures/<entrypoint>.pt`` (``torch.load(..., weights_only=True)``) holds ``name``, ``kwargs`` (the
tiny overrides passed to ``timm.create_model``), ``state_dict``, ``input``, ``output`` and ``features`` (the list
of stage maps). The model is built in float32, every floating parameter and buffer is perturbed with a fixed seed
(the stock inits leave layer scales at 1e-5 and position biases near 0, which would hide errors in the attention
branch), then cast to float64 and run in eval mode. The state dict and the input are stored as float32 to keep
the files small: they hold float32 values exactly, so loading them into the float64 model reproduces the float64
run bit for bit. Outputs and features are stored in float64. The state dict's floating tensors are views of one
storage (``torch.save`` then writes one record instead of one per tensor); it loads as any state dict does.
"""

from __future__ import annotations

import pathlib

import torch

FIXTURE_DIR = pathlib.Path(__file__).resolve().parent / "fixtures"
INPUT_SHAPE = (1, 3, 32, 40)  # non-square: a height/width mix-up changes the numbers

# NAT / DiNAT: two layers in stages 1-2 so DiNAT's dilated layers (dilation 8/4, 13/6) run; stage maps at 48x64 are
# 8x10, 4x5, 2x3, 1x2, so maps both larger and smaller than the window (the padded path) occur.
_NAT = dict(depths=(2, 2, 1, 1), num_heads=(1, 1, 2, 2), embed_dim=2, num_classes=5)
# BiFormer: the n_win=7 grid pads every stage; n_win=2 divides stages 1-2 (8x10, 4x5 pads); qk_dims != embed_dims
# on one member. The last stage's full attention has 8 heads, so its width is a multiple of 8.
_BIFORMER = dict(depths=(1, 1, 1, 1), embed_dims=(4, 8, 8, 8), head_dim=2, num_classes=5)

CONFIGS: dict[str, dict] = {
    **{name: dict(_NAT) for name in (
        "nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
        "dinat_large", "dinat_large_384", "dinat_large_11x11")},
    "biformer_tiny": dict(_BIFORMER),
    "biformer_small": dict(_BIFORMER, n_win=2, topks=(1, 3, 4, -2)),
    "biformer_base": dict(_BIFORMER, embed_dims=(4, 8, 8, 16), qk_dims=(2, 4, 8, 8)),
}


def build(name: str, kwargs: dict) -> torch.nn.Module:
    """The tiny model in float64, eval mode (weights as created: the caller loads or perturbs them)."""
    import timm

    import visattn  # noqa: F401  (registers the families)

    return timm.create_model(name, **kwargs).double().eval()


def run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's output and its ``forward_intermediates`` stage maps for ``x``."""
    with torch.no_grad():
        return model(x), list(model.forward_intermediates(x, intermediates_only=True))


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            else:
                tensor.add_(0.2 * noise)


def _one_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, the floating ones as views of one flat storage (non-floating ones unchanged)."""
    floating = [k for k, v in tensors.items() if v.is_floating_point()]
    dtypes = {tensors[k].dtype for k in floating}
    if len(dtypes) > 1:
        raise ValueError(f"expected one floating dtype, got {dtypes}")
    out = dict(tensors)
    if floating:
        flat = torch.cat([tensors[k].reshape(-1) for k in floating])
        for k, part in zip(floating, flat.split([tensors[k].numel() for k in floating]), strict=True):
            out[k] = part.view(tensors[k].shape)
    return out


def make(name: str, seed: int) -> dict:
    """One fixture record (see the module docstring)."""
    import timm

    import visattn  # noqa: F401

    kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()  # float32: perturbed values stay float32-exact
    gen = torch.Generator().manual_seed(seed)
    _perturb(model, gen)
    x = torch.randn(INPUT_SHAPE, generator=gen)
    state = _one_storage(model.state_dict())  # copies: later casts do not touch it
    output, features = run(model.double(), x.double())
    return dict(name=name, kwargs=kwargs, state_dict=state, input=x, output=output, features=features)


def main() -> None:
    FIXTURE_DIR.mkdir(exist_ok=True)
    total = 0
    for seed, name in enumerate(CONFIGS):
        path = FIXTURE_DIR / f"{name}.pt"
        torch.save(make(name, seed), path)
        total += path.stat().st_size
        print(f"{path.name}: {path.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
