"""Checks shared by the model-family tests: a short real training run on scikit-learn's digits, gradient
checkpointing against the plain forward/backward, the backward against finite differences, the CUDA default
dispatch against the reference path, and (``patch_timm`` families) outputs and gradients against stock timm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (a real data set shipped with the package) as [1797, 3, 32, 32] in [-1, 1]."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn ships the digits data set")
    data = datasets.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target)


def assert_learns_digits(model: torch.nn.Module, steps: int = 60) -> None:
    """``steps`` AdamW steps (batch 64) on 1500 digits must cut the held-out cross-entropy to < 0.6x its start and
    below 1.5 (chance is log 10 = 2.30), with > 50% held-out accuracy."""
    images, labels = digits_32()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=gen)
    train, held = order[:1500], order[1500:]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def held_out() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(images[held])
        model.train()
        return F.cross_entropy(logits, labels[held]).item(), (logits.argmax(-1) == labels[held]).float().mean().item()

    before, _ = held_out()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (64,), generator=gen)]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, accuracy = held_out()
    assert after < 0.6 * before and after < 1.5, (before, after)
    assert accuracy > 0.5, accuracy


def assert_grad_checkpointing_matches(model: torch.nn.Module, x: torch.Tensor) -> None:
    """``set_grad_checkpointing(True)`` gives the same outputs and parameter gradients (model in train mode)."""

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = run()
    model.set_grad_checkpointing(True)
    ckpt, ckpt_grads = run()  # checkpointed blocks recompute in backward
    torch.testing.assert_close(ckpt, plain)
    for a, b in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)


def assert_cuda_auto_matches_reference(name: str, dtype: torch.dtype) -> None:
    """``name`` at 224 on CUDA: the default dispatch (fused kernels / SDPA) against every attention module forced to
    the exact reference, in float32: logits and every parameter's gradient; bf16 autocast as the benchmarks run."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0).cuda().train()
    x = torch.randn(4, 3, 224, 224, device="cuda")

    def step(backend, autocast_dtype=None):
        for module in model.modules():
            if isinstance(getattr(module, "backend", None), str):
                module.backend = backend
        model.zero_grad()
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        out.float().logsumexp(-1).mean().backward()
        return out.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()]

    want, want_grads = step("reference")
    got, got_grads = step("auto", None if dtype == torch.float32 else dtype)
    tol = 1e-2 if dtype == torch.float32 else 5e-2
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < tol
    if dtype == torch.float32:
        for (param, _), a, b in zip(model.named_parameters(), got_grads, want_grads, strict=True):
            assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 2e-2, param
    else:
        assert all(torch.isfinite(g).all() for g in got_grads)


def assert_gradient_matches_finite_differences(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Float64: every parameter (and the input) gets a gradient, and the gradient's directional derivative along
    one random direction over all of them equals the central finite difference of the loss (an oracle independent
    of the backward code)."""
    names = ["input", *(n for n, _ in model.named_parameters())]
    leaves = [x.requires_grad_(True), *model.parameters()]
    grads = torch.autograd.grad(model(x).logsumexp(-1).sum(), leaves, allow_unused=True)
    missing = [n for n, g in zip(names, grads, strict=True) if g is None or not torch.isfinite(g).all()]
    assert not missing, missing
    gen = torch.Generator().manual_seed(1)
    directions = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in leaves]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions, strict=True))
    eps = 1e-6

    def shifted(sign):
        with torch.no_grad():
            for t, d in zip(leaves, directions, strict=True):
                t.add_(sign * eps * d)
            value = float(model(x).logsumexp(-1).sum())
            for t, d in zip(leaves, directions, strict=True):
                t.sub_(sign * eps * d)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def forward_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and the gradients of every parameter and of the input (key ``"<input>"``) under a fixed
    linear loss (weights spread over [-1, 1], so no output can cancel out)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.clone()
    return out.detach(), grads


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str = "output", tol: float = 1e-5) -> None:
    """max |got - want| <= tol * max(1, max |want|): float32 equality relative to the tensor's scale (gradients
    reach O(100) in some timm blocks, where stock float32 timm is itself ~1e-4 off its float64 values)."""
    assert got.shape == want.shape, what
    err, scale = (got - want).abs().max().item(), max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} at scale {scale:.3g}"
