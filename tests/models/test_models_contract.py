"""What timm's own model suite holds every model to, checked for each visattn family on a small config: argument
validation at creation, timm's ``device=`` / ``dtype=`` factory keywords, and torch.fx tracing through timm's
notrace registration (the feature extractor timm and torchvision build)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules

import visattn  # noqa: F401  (registers the models)
from visattn.models import agent, agent_deit, agent_pvt, biformer

SMALL = {
    "nat_mini": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), kernel_size=3, mlp_ratio=2.0),
    "dinat_mini": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3, mlp_ratio=2.0,
                       dilations=[[1, 2]] * 4),
    "biformer_tiny": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=8, n_win=2,
                          topks=(1, 2, 4, -2)),
    "agent_swin_t": dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), agent_num=(4, 4, 4, 4),
                         img_size=64),
    "agent_pvt_t": dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
                        depths=(1, 1, 1, 1), agent_num=(4, 4, 1, 1), img_size=32),
    "agent_deit_t": dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, agent_num=4, agent_layer=2),
    "medvitv2_tiny": dict(stem_chs=(16, 8, 16), depths=(1, 1, 3, 1), dims=(32, 128, 128, 128), head_dim=16,
                          attn_kernel=3),
}
NAMES = list(SMALL)
SIZE = {"nat_mini": 64, "dinat_mini": 64, "biformer_tiny": 64, "agent_swin_t": 64, "agent_pvt_t": 32,
        "agent_deit_t": 32, "medvitv2_tiny": 64}
LEVELS = {"agent_deit_t": 4}  # features_only levels (blocks for Agent-DeiT, stages otherwise)
# torchvision notes that eval-mode nodes are a subsequence of train-mode ones (dropout / drop path): expected here
pytestmark = pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing:UserWarning")


def small(name: str, **extra):
    return timm.create_model(name, **dict(SMALL[name], **extra))


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad,error,match", [
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(num_classes=2.5), TypeError, "num_classes"),
    (dict(in_chans=0), ValueError, "in_chans"),
    (dict(not_a_model_arg=1), TypeError, "not_a_model_arg"),
    (dict(drop_path_rate=1.5), ValueError, "drop_path_rate"),
    (dict(drop_path_rate=1.0), ValueError, "drop_path_rate"),
    (dict(drop_rate=-0.1), ValueError, "drop_rate"),
    (dict(features_only=True, out_indices=(0, 9)), ValueError, "out_indices"),
    (dict(features_only=True, out_indices=(-9,)), ValueError, "out_indices"),
    (dict(features_only=True, out_indices=("a",)), TypeError, "out_indices"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(device=3.0), TypeError, "device"),
])
def test_bad_arguments_raise_at_creation_naming_the_argument(name, bad, error, match):
    with pytest.raises(error, match=match):
        small(name, **bad)


@pytest.mark.parametrize("name", NAMES)
def test_edge_values_are_accepted(name):
    levels = LEVELS.get(name, 4)
    model = small(name, num_classes=0, drop_path_rate=0.0, device="meta")
    assert model.num_classes == 0
    features = small(name, features_only=True, out_indices=(-1, 0))
    assert len(features.feature_info.channels()) == 2 and levels > 1


# ----------------------------------------------------------------------------------------------- device / dtype
@pytest.mark.parametrize("name", NAMES)
def test_factory_device_and_dtype_are_honoured(name):
    meta = small(name, device="meta", dtype=torch.bfloat16)
    tensors = dict(meta.named_parameters()) | dict(meta.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert {t.dtype for n, t in tensors.items() if not n.endswith("num_batches_tracked")} == {torch.bfloat16}

    torch.manual_seed(0)
    doubled = small(name, device="cpu", dtype=torch.float64).eval()
    torch.manual_seed(0)
    reference = small(name).eval()  # same init, float32: cast by hand as the oracle
    x = torch.randn(2, 3, SIZE[name], SIZE[name], dtype=torch.float64)
    with torch.no_grad():
        got = doubled(x)
        want = reference.double()(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_keeps_device_dtype_and_mode(name):
    """timm's contract: a new head lands with the model's parameters, in the model's train/eval mode."""
    model = small(name, in_chans=1, device="meta", dtype=torch.float64).eval()
    assert model.in_chans == 1
    model.reset_classifier(0)
    model.reset_classifier(3)
    head = model.get_classifier()
    assert {(p.device.type, p.dtype) for p in head.parameters()} == {("meta", torch.float64)}
    assert head.out_features == 3 and not head.training


@pytest.mark.parametrize("module,args", [
    (biformer.AttentionLePE, (16, 2)),
    (agent.AgentAttention, (16, 2, (8, 8), 4)),
    (agent.WindowAttention, (16, 2, (4, 4))),
    (agent_pvt.PvtAgentAttention, (16, 2, (8, 8), 4)),
    (agent_pvt.SpatialReductionAttention, (16, 2, 2)),
    (agent_deit.DeitAgentAttention, (16, 2, (4, 4), 4)),
])
def test_attention_modules_take_factory_keywords(module, args):
    layer = module(*args, device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {("meta", torch.float16)}
    assert "device" in str(__import__("inspect").signature(module))


# ----------------------------------------------------------------------------------------------- torch.fx
def _trace(model):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_eager_and_trains(name):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = small(name, num_classes=7).eval()
    x = torch.randn(2, 3, SIZE[name], SIZE[name])
    traced = _trace(model)
    with torch.no_grad():
        (got,) = traced(x).values()
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    model.train()
    traced = _trace(model)
    (out,) = traced(x).values()
    out.square().mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["agent_deit_t", "agent_pvt_t", "agent_swin_t"])
def test_fx_graph_keeps_the_input_size_checks(name):
    """The size checks are leaves of the trace, so a traced model still refuses a wrong input size."""
    pytest.importorskip("torchvision")
    traced = _trace(small(name).eval())
    with pytest.raises(ValueError, match="img_size|map"):
        traced(torch.randn(1, 3, 2 * SIZE[name], 2 * SIZE[name]))
