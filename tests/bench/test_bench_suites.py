"""bench-attn suites: the shipped YAML files load into typed problems at the models' real stage shapes, bad files
fail naming the field, floors follow hand-counted FLOPs and bytes, and the Flex peer masks the same pattern."""

import inspect
import math

import pytest
import torch

from visattn.bench import attn, dense, suites
from visattn.bench.suites import Problem, SuiteError, fewest_bytes, load_suite, parse_suite, useful_flops


def test_builtin_suites_load_and_are_shipped_as_package_data():
    names = suites.builtin_suites()
    assert {"core", "vision", "flux", "video", "sweep"} <= set(names)
    for name in names:
        suite = load_suite(name)
        assert suite.problems and all(isinstance(p, Problem) for p in suite.problems)
    assert attn.DEFAULT_SUITE in names


def _by_name(suite):
    return {p.name: p for p in load_suite(suite).problems}


def test_vision_suite_matches_timm_swin_tiny_stage_shapes():
    """Oracle: timm's own swin_tiny_patch4_window7_224 (resolution, heads, window, shift of every block)."""
    import timm

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model("swin_tiny_patch4_window7_224")
    problems = _by_name("vision")
    for index, stage in enumerate(model.layers):
        for block in stage.blocks:
            height, width = block.input_resolution
            shift = tuple(block.shift_size)
            name = f"swin-t-s{index + 1}" + (f"-shift{shift[0]}x{shift[1]}" if any(shift) else "")
            p = problems[name]
            assert p.op == "window" and p.spatial == (height, width) and p.kernel == tuple(block.window_size)
            assert p.heads == block.attn.num_heads and p.heads * p.head_dim == block.attn.qkv.in_features
            assert (p.shift or (0, 0)) == shift and p.batch == 256
            assert problems[name + "-rpb-backward"].rpb and problems[name + "-rpb-backward"].backward


def test_vision_suite_matches_nat_and_dinat_tiny_stage_shapes():
    """Oracle: visattn's registered nat_tiny / dinat_tiny (map, heads, kernel, dilation of every layer)."""
    import timm

    import visattn  # noqa: F401

    problems = _by_name("vision")
    for model_name, prefix in (("nat_tiny", "nat-t"), ("dinat_tiny", "dinat-t")):
        with torch.device("meta"):
            model = timm.create_model(model_name)
        seen = set()
        for module in model.modules():
            if not hasattr(module, "kernel_size") or not hasattr(module, "num_heads"):
                continue
            dilation = tuple(module.dilation) if isinstance(module.dilation, (tuple, list)) else (module.dilation,) * 2
            seen.add((module.num_heads, tuple(module.kernel_size) if isinstance(module.kernel_size, (tuple, list))
                      else (module.kernel_size,) * 2, dilation))
        assert len(seen) == (4 if prefix == "nat-t" else 7)  # NAT: 4 stages; DiNAT: + 3 dilated variants
        stage_of_heads = {2: (1, 56), 4: (2, 28), 8: (3, 14), 16: (4, 7)}
        for heads, kernel, dilation in seen:
            stage, side = stage_of_heads[heads]
            name = f"nat-t-s{stage}" if dilation == (1, 1) else f"{prefix}-s{stage}-d{dilation[0]}"
            p = problems[name]
            assert (p.spatial, p.kernel, p.heads, p.head_dim) == ((side, side), kernel, heads, 32), name
            assert (p.dilation or (1, 1)) == dilation


def test_video_suite_matches_the_ltx25_decoder_config():
    """Oracle: diffusers' LTX-2.5 decoder defaults (channels / head_dim heads, NA kernels per stage)."""
    decoder = pytest.importorskip("diffusers.models.autoencoders.ltx2_diffusion_decoder")
    defaults = {k: v.default for k, v in inspect.signature(decoder.LTX2VideoDiffusionDecoder3d).parameters.items()}
    problems = _by_name("video")
    for stage in range(4):
        p = problems[f"ltx25-s{stage + 1}"]
        assert p.kernel == tuple(defaults["stage_kernels"][stage])
        assert p.heads == defaults["stage_channels"][stage] // defaults["head_dim"] and p.head_dim == 64
    assert problems["ltx25-s5-tile"].kernel == tuple(defaults["stage5_kernel"])
    assert problems["ltx25-s5-tile"].heads == defaults["stage_channels"][-1] // defaults["head_dim"]
    # 121 frames at 1024x1536: latent 16x32x48 plus 2 ghost frames; each x2 temporal upsample drops one frame
    assert problems["ltx25-s1"].spatial == (16 + 2, 1024 // 32, 1536 // 32)
    assert problems["ltx25-s3"].spatial == (2 * 18 - 1, 64, 96)
    assert problems["ltx25-s4"].spatial == (2 * 35 - 1, 128, 192)


def test_floor_arithmetic_against_hand_counts():
    nat = Problem("nat", spatial=(56, 56), kernel=(7, 7), heads=2, head_dim=32, batch=256, dtype="float16")
    # 4 * 256 * 2 * 3136 * 49 * 32 (QK^T and PV, 2 FLOPs per MAC each)
    assert useful_flops(nat) == 10_070_523_904
    # q, k, v read + o written: 4 * 256*3136*2*32 elements * 2 bytes
    assert fewest_bytes(nat) == 411_041_792
    both = Problem("nat", spatial=(56, 56), kernel=(7, 7), heads=2, head_dim=32, batch=256, dtype="float16",
                   backward=True)
    assert useful_flops(both) == 10_070_523_904 * 3.5
    # + q, k, v, o, dO read and dq, dk, dv written (8 tensors) + float32 LSE written and read (2 * 256*3136*2*4)
    assert fewest_bytes(both) == 411_041_792 + 822_083_584 + 12_845_056
    bra = Problem("bra", op="routing", spatial=(56, 56), regions=(7, 7), topk=1, heads=2, head_dim=32, batch=128)
    assert useful_flops(bra) == 4 * 128 * 2 * 3136 * (1 * 64) * 32  # each query sees one 8x8 region
    ceilings = {"matmul_tflops": 100.0, "copy_gbs": 1000.0}
    f = attn.floor(nat, ceilings)
    assert f["floor_kind"] == "memory" and f["floor_ms"] == pytest.approx(411_041_792 / 1e12 * 1e3)
    flux = Problem("flux", spatial=(256, 256), kernel=(80, 80), heads=24, head_dim=128)
    f = attn.floor(flux, ceilings)
    assert f["floor_kind"] == "matmul"
    assert f["floor_ms"] == pytest.approx(4 * 24 * 65536 * 6400 * 128 / 100e12 * 1e3)


@pytest.mark.parametrize("problem", [
    Problem("na", spatial=(9, 7), kernel=(3, 5), heads=1, head_dim=8),
    Problem("dil", spatial=(12, 10), kernel=(3, 3), dilation=(2, 3), heads=1, head_dim=8),
    Problem("gna", spatial=(11, 9), kernel=(4, 3), stride=(2, 3), heads=1, head_dim=8),
    Problem("dil-gna", spatial=(13, 8), kernel=(3, 2), dilation=(3, 2), stride=(2, 2), heads=1, head_dim=8),
    Problem("win", op="window", spatial=(8, 12), kernel=(4, 4), shift=(2, 1), heads=1, head_dim=8),
    Problem("na3d", spatial=(4, 5, 6), kernel=(3, 3, 5), dilation=(1, 1, 1), heads=1, head_dim=8),
], ids=lambda p: p.name)
def test_flex_peer_mask_is_the_same_pattern_as_the_dense_oracle(problem):
    """The FlexAttention peer must compute the same function: its mask_mod against visattn.bench.dense's masks."""
    n = problem.tokens
    q_idx = torch.arange(n)[:, None].expand(n, n)
    kv_idx = torch.arange(n)[None, :].expand(n, n)
    got = attn.na_mask_mod(problem)(None, None, q_idx, kv_idx)
    if problem.op == "window":
        masks = [dense.window_mask_1d(s, w, t) for s, w, t in zip(problem.spatial, problem.kernel, problem.shift,
                                                                          strict=True)]
    else:
        rank = problem.rank
        masks = [dense.na_mask_1d(*a) for a in zip(problem.spatial, problem.kernel, problem.dilation or (1,) * rank,
                                                   problem.stride or (1,) * rank, (False,) * rank, strict=True)]
    want = dense._outer_and(masks)
    assert torch.equal(got, want)
    if problem.op == "na":  # every query sees exactly prod(kernel) keys (NATTEN semantics, non-causal)
        assert (want.sum(1) == math.prod(problem.kernel)).all()


def _suite(problem, **top):
    return {"suite": "t", "problems": [problem], **top}


@pytest.mark.parametrize("problem, message", [
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernal": [3, 3]}, "unknown field(s) ['kernal']"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3]}, "field 'kernel' must have 2"),
    ({"name": "a", "spatial": [8, 8], "heads": 0, "head_dim": 8, "kernel": [3, 3]}, "field 'heads' must be a pos"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3, 3], "dtype": "int8"}, "field 'dtype'"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [5, 5], "dilation": [2, 2]},
     "'kernel' × 'dilation' = 5×2 exceeds spatial[0] = 8"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8}, "field 'kernel' is required"),
    ({"name": "a", "op": "window", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3, 3]},
     "does not divide spatial[0]"),
    ({"name": "a", "op": "routing", "spatial": [8, 8], "regions": [2, 2], "topk": 5, "heads": 1, "head_dim": 8},
     "field 'topk' must be in 1..4"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3, 3], "peers": ["cudnn"]},
     "field 'peers'"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3, 3], "sweep": {"rbp": [True]}},
     "'sweep' names 'rbp'"),
    ({"spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3, 3]}, "missing field 'name'"),
    ({"name": "a", "spatial": [8, 8], "heads": 1, "head_dim": 8, "kernel": [3, 3], "rpb": "yes"},
     "field 'rpb' must be true or false"),
])
def test_bad_problems_fail_naming_the_field(problem, message):
    with pytest.raises(SuiteError) as err:
        parse_suite(_suite(problem), "my.yaml")
    assert message in str(err.value) and "my.yaml: problems[0]" in str(err.value)


def test_suite_level_errors_and_sweep_expansion(tmp_path):
    with pytest.raises(SuiteError, match="repeated: \\['a'\\]"):
        parse_suite({"problems": [{"name": "a", "spatial": [8], "kernel": [3], "heads": 1, "head_dim": 8}] * 2})
    with pytest.raises(SuiteError, match="unknown top-level key"):
        parse_suite({"problem": []}, "x.yaml")
    with pytest.raises(SuiteError, match="neither a file nor a built-in suite"):
        load_suite("no_such_suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("problems: [unclosed")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(str(bad))
    good = tmp_path / "mine.yaml"
    good.write_text("defaults: {heads: 2, head_dim: 16, dtype: bf16}\nproblems:\n"
                    "  - {name: x, spatial: [16, 16], kernel: 3, sweep: {rpb: [false, true], head_dim: [16, 32]}}\n")
    suite = load_suite(str(good))
    assert suite.name == "mine"
    assert [p.name for p in suite.problems] == ["x-head_dim16", "x-head_dim32", "x-rpb-head_dim16",
                                                "x-rpb-head_dim32"]
    assert all(p.kernel == (3, 3) and p.dtype == "bfloat16" and p.heads == 2 for p in suite.problems)


def test_bench_attn_list_and_only_need_no_gpu(capsys):
    from visattn import cli

    assert cli.main(["bench-attn", "--suite", "vision", "--only", "biformer-t-s2,nat-t-s1", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["biformer-t-s2", "nat-t-s1"]
    assert cli.main(["bench-attn", "--suite", "vision", "--only", "nope", "--list"]) == 2
    assert "no problem named ['nope']" in capsys.readouterr().err
