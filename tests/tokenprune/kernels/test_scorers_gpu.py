"""CDPruner's one-launch greedy DPP MAP and VisPruner's one-launch removal equal their eager PyTorch loops
(``backends.use_backend("reference")``) on the same CUDA tensors, at LLaVA-1.5 sizes (576 patches, CLIP width
1024, projector width 4096) and a few odd ones."""

import pytest
import torch

from visattn import backends

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("groups,tokens,keep,text", [(8, 576, 64, 20), (8, 576, 128, 20), (1, 576, 64, 0),
                                                     (2, 2880, 320, 12), (3, 17, 17, 4)])
def test_dpp_kernel_equals_eager_loop(groups, tokens, keep, text):
    from visattn.tokenprune.cdpruner import conditional_kernel
    from visattn.tokenprune.kernels.dpp import dpp_picks
    from visattn.tokenprune.selection import dpp_greedy_map

    gen = torch.Generator(device="cuda").manual_seed(groups * tokens + keep)
    visual = torch.randn(groups, tokens, 4096, device="cuda", generator=gen, dtype=torch.float16)
    words = torch.randn(groups, text, 4096, device="cuda", generator=gen, dtype=torch.float16)
    kernel = conditional_kernel(visual, words if text else None, torch.ones(groups, text, dtype=torch.bool,
                                                                             device="cuda"))
    with backends.use_backend("reference", family="tokenprune"):
        want = dpp_greedy_map(kernel, keep)
    assert torch.equal(dpp_greedy_map(kernel, keep), want)
    assert torch.equal(dpp_picks(kernel, keep, block_n=1024, block_t=8, num_warps=8).sort(-1).values, want)


@pytest.mark.parametrize("groups,patches,residual,target", [(8, 576, 544, 32), (8, 576, 512, 64), (1, 576, 545, 31),
                                                            (4, 2880, 2800, 150), (2, 50, 49, 1)])
def test_dedup_kernel_equals_eager_loop(groups, patches, residual, target):
    from visattn.tokenprune.vispruner import remove_duplicates

    gen = torch.Generator(device="cuda").manual_seed(groups * patches + target)
    feats = torch.randn(groups, patches, 1024, device="cuda", generator=gen, dtype=torch.float16)
    order = torch.rand(groups, patches, device="cuda", generator=gen).argsort(-1)[:, :residual]
    with backends.use_backend("reference", family="tokenprune"):
        want = remove_duplicates(feats, order, target)
    assert torch.equal(remove_duplicates(feats, order, target), want)
