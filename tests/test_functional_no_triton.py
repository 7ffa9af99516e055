"""Without triton importable (macOS, Windows, a broken install) every attention op and module runs its reference
path with the right numbers, and a forced ``backend="triton"`` says why it cannot run.

The check runs in a child process that hides triton (tests/no_triton.py: ``import triton`` raises
``ModuleNotFoundError`` and ``find_spec`` answers None, as for a missing package) before anything imports visattn.
"""

import json
import subprocess
import sys

from interpreted import child_env
from no_triton import hide_triton


def run_child() -> dict:
    hide_triton()
    import torch
    from oracle import agent_oracle, bra_oracle, na_oracle, window_oracle

    import visattn
    from visattn import backends
    from visattn import nn as vnn

    report = {}
    try:
        import triton  # noqa: F401

        report["triton_hidden"] = False
    except ImportError:
        report["triton_hidden"] = True
    gen = torch.Generator().manual_seed(0)
    q2, k2, v2 = (torch.randn(1, 6, 7, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    q1 = torch.randn(2, 11, 2, 8, generator=gen, dtype=torch.float64)
    q3 = torch.randn(1, 3, 4, 5, 2, 8, generator=gen, dtype=torch.float64)
    extra = torch.randn(1, 2, 2, 8, generator=gen, dtype=torch.float64)
    agents = torch.randn(1, 3, 2, 8, generator=gen, dtype=torch.float64)
    q8, k8, v8 = (torch.randn(1, 8, 8, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))

    def err(a, b):
        return float((a - b).abs().max())

    out, lse = visattn.na1d(q1, q1, q1, 3, 2, return_lse=True)
    want, want_lse = na_oracle(q1, q1, q1, 3, 2, return_lse=True)
    report["na1d"] = max(err(out, want), err(lse, want_lse))
    report["na2d"] = err(visattn.na2d(q2, k2, v2, 3, 1, 2, additional_keys=extra, additional_values=extra),
                         na_oracle(q2, k2, v2, 3, 1, 2, additional_keys=extra, additional_values=extra))
    report["na3d"] = err(visattn.na3d(q3, q3, q3, 2, is_causal=True), na_oracle(q3, q3, q3, 2, is_causal=True))
    report["window"] = err(visattn.window_attention(q8, k8, v8, 4, 2), window_oracle(q8, k8, v8, 4, 2))
    report["agent"] = err(visattn.agent_attention(q2, k2, v2, agents), agent_oracle(q2, k2, v2, agents))
    report["routing"] = err(visattn.bilevel_routing_attention(q8, k8, v8, 2, 2), bra_oracle(q8, k8, v8, 2, 2)[0])
    report["which"] = sorted({visattn.which_backend("na2d", q2, k2, v2, 3),
                              visattn.which_backend("window_attention", q8, k8, v8, 4),
                              visattn.which_backend("bilevel_routing_attention", q8, k8, v8, 2, 2),
                              visattn.which_backend("agent_attention", q2, k2, v2, agents)})
    x = torch.randn(2, 8, 8, 16, generator=gen)
    modules = [vnn.NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True), vnn.WindowAttention(16, 4, 2, shift_size=1),
               vnn.AgentAttention(16, 8, 2, agent_num=4), vnn.BiLevelRoutingAttention(16, 2, 2, topk=2)]
    report["modules_finite"] = all(bool(torch.isfinite(m(x)).all()) for m in modules)
    try:
        visattn.na2d(q2.float(), k2.float(), v2.float(), 3, backend="triton")
        report["forced"] = "ran"
    except ValueError as error:
        report["forced"] = str(error)
    report["kernel_reasons"] = [reason for _, reason in backends.list_kernels("cpu")]
    return report


def test_every_op_runs_its_reference_path_without_triton():
    proc = subprocess.run([sys.executable, __file__], env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["triton_hidden"]
    for op in ("na1d", "na2d", "na3d", "window", "agent", "routing"):
        assert report[op] < 1e-10, (op, report[op])
    assert report["which"] == ["reference"]
    assert report["modules_finite"]
    assert "triton" in report["forced"].lower() and report["forced"] != "ran"
    assert report["kernel_reasons"] and all(reason for reason in report["kernel_reasons"])


if __name__ == "__main__":
    print(json.dumps(run_child()))
