"""``pretrained=True`` for every registered visattn name, offline: timm's real download and cache code (torch.hub's
``download_url_to_file`` for URLs, huggingface_hub for hub repos) against the local server of ``offline_hub``,
serving synthetic checkpoints in each family's official layout (written from the official sources, see
offline_hub.py). Models are built small through the registered names (the URL / repo and the cache file name
depend only on the name), so the checkpoints stay tiny."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from offline_hub import official_checkpoint

import visattn  # noqa: F401  (registers the models)
from visattn.models import _helpers

SMALL = {  # per family: a shrunken config of the registered architecture
    "nat": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), kernel_size=3, mlp_ratio=2.0),
    "biformer": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=8, n_win=2, topks=(1, 2, 4, -2)),
    "agent": dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), agent_num=(4, 4, 4, 4)),
    "agent_pvt": dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
                      depths=(1, 1, 1, 1), agent_num=(4, 4, 1, 1)),
    "agent_deit": dict(embed_dim=32, depth=2, num_heads=2, agent_num=4),
}
# (official key, our key) of one tensor the checkpoint filter must carry over unchanged, per family
STEM = {"nat": ("embeddings.patch_embeddings.projection.0.weight", "patch_embed.proj.0.weight"),
        "biformer": ("downsample_layers.0.0.weight", "stem.0.weight"),
        "agent": ("patch_embed.proj.weight", "patch_embed.proj.weight"),
        "agent_pvt": ("patch_embed1.proj.weight", "stages.0.patch_embed.proj.weight"),
        "agent_deit": ("patch_embed.proj.weight", "patch_embed.proj.weight")}
FAMILIES = tuple(SMALL)
PRETRAINED = sorted(n for f in FAMILIES for n in timm.list_pretrained()
                    if n.split(".")[0] in timm.list_models(module=f))


def family(name: str) -> str:
    return next(f for f in FAMILIES if name.split(".")[0] in timm.list_models(module=f))


def small_kwargs(name: str) -> dict:
    """The family's small config at the tag's input size (Agent-* tags fix it: the biases are sized for it)."""
    size = timm.models.get_pretrained_cfg(name).input_size[-1]
    kwargs = dict(SMALL[family(name)])
    if family(name).startswith("agent"):
        kwargs["img_size"] = size
    if family(name) == "agent_deit":
        kwargs["patch_size"] = size // 4
    return kwargs


def test_every_family_has_registered_weights():
    assert {family(n) for n in PRETRAINED} == set(FAMILIES)
    assert len(PRETRAINED) == 28


def test_every_registered_name_downloads_to_its_own_file_and_loads(offline_hub):
    """All names in one cache: each fetches its own URL / repo once, into a file of its own, and the model holds
    that name's checkpoint (each is seeded differently, so loading another name's file would show)."""
    served = {}
    for seed, name in enumerate(PRETRAINED):
        kwargs = small_kwargs(name)
        checkpoint = official_checkpoint(name, seed=seed, **kwargs)
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.hf_hub_id:
            offline_hub.serve_hf(cfg.hf_hub_id, "pytorch_model.bin", checkpoint)
        else:
            offline_hub.serve_url(cfg.url[0], checkpoint)
        served[name] = (checkpoint, kwargs)
    checkpoints = os.path.join(offline_hub.root, "torch_hub", "checkpoints")
    for name, (checkpoint, kwargs) in served.items():
        model = timm.create_model(name, pretrained=True, **kwargs)
        official, ours = STEM[family(name)]
        state = checkpoint.get("model", checkpoint)
        prefix = "nat." if "nat." + official in state else ("dinat." if "dinat." + official in state else "")
        torch.testing.assert_close(model.state_dict()[ours], state[prefix + official], rtol=0, atol=0)
        head = "classifier.weight" if family(name) == "nat" else "head.weight"
        torch.testing.assert_close(model.state_dict()["head.weight"], state[head], rtol=0, atol=0)
    urls = [u for m, u in offline_hub.requests  # weight files only (huggingface_hub also asks /api/... paths)
            if m == "GET" and "://" in u and not u.endswith(".safetensors")]
    assert len(urls) == len(set(urls)) == len(PRETRAINED)  # one download per name, none shared
    url_names = [n for n in PRETRAINED if not timm.models.get_pretrained_cfg(n).hf_hub_id]
    want = sorted(_helpers.pretrained_file_name(*n.split(".")) for n in url_names)
    assert sorted(os.listdir(checkpoints)) == want
    for name in url_names[:2]:  # a second creation reads the cache
        before = len(offline_hub.requests)
        timm.create_model(name, pretrained=True, **served[name][1])
        assert len(offline_hub.requests) == before


def test_pretrained_adapts_in_chans_and_num_classes(offline_hub):
    """What timm's test_model_load_pretrained asks: in_chans=1 and a new head on top of the official weights."""
    name = "agent_swin_t.in1k"
    kwargs = small_kwargs(name)
    offline_hub.serve_registered(name, **kwargs)
    model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=5, **kwargs)
    official = official_checkpoint(name, **kwargs)["model"]["patch_embed.proj.weight"]
    torch.testing.assert_close(model.patch_embed.proj.weight, official.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    assert model.head.out_features == 5
    features = timm.create_model(name, pretrained=True, features_only=True, **kwargs)
    assert len(features(torch.randn(1, 3, kwargs["img_size"], kwargs["img_size"]))) == 4


def test_published_hash_is_verified(offline_hub):
    """A file name carrying ``-<sha256 prefix>`` (timm's convention) is checked by timm's download."""
    name = "biformer_tiny.in1k"
    kwargs = small_kwargs(name)
    url = offline_hub.serve_registered(name, **kwargs)
    with pytest.raises(RuntimeError, match="invalid hash"):
        timm.create_model(name, pretrained=True, **kwargs,
                          pretrained_cfg_overlay=dict(url=(url, _helpers.pretrained_file_name("x", "y", "00ff"))))
    data = offline_hub._payload(offline_hub._urls[url])
    import hashlib

    good = _helpers.pretrained_file_name("biformer_tiny", "in1k", hashlib.sha256(data).hexdigest()[:8])
    timm.create_model(name, pretrained=True, **kwargs, pretrained_cfg_overlay=dict(url=(url, good)))
    assert good in os.listdir(os.path.join(offline_hub.root, "torch_hub", "checkpoints"))


@pytest.mark.parametrize("name", ["nat_mini", "biformer_tiny", "agent_swin_t", "agent_pvt_t", "agent_deit_t"])
def test_bare_tensor_file_is_refused_naming_the_argument(name, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torch.zeros(3), path)
    kwargs = small_kwargs(timm.list_pretrained(name + "*")[0])
    with pytest.raises(TypeError, match=r"pretrained_cfg_overlay\['file'\].*bare tensor"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    torch.save([1, 2], path)
    with pytest.raises(TypeError, match=r"pretrained_cfg_overlay\['file'\].*list"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def test_bare_tensor_download_is_refused_naming_the_source(offline_hub):
    name = "agent_deit_t.in1k"
    url = timm.models.get_pretrained_cfg(name).url[0]
    offline_hub.serve_url(url, torch.zeros(2, 2))
    with pytest.raises(TypeError, match="agent_deit_t.*bare tensor"):
        timm.create_model(name, pretrained=True, **small_kwargs(name))
