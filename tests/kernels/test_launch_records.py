"""The cached-launch bookkeeping of ``visattn.kernels.launch`` against a stand-in for Triton's kernel objects: the
first call goes through ``kernel[grid](...)`` with keyword constexprs, later calls hand the compiled kernel's runner
every parameter in signature order (what Triton's own launch passes it), and a record missing a parameter is
refused when it is built. The real kernels' launches run in the interpreter and GPU tests."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from visattn.kernels import launch  # noqa: E402


class _Compiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def runner(*args):
            self.log.append(("runner", grid, args))

        return runner


class _FakeKernel:
    """Parameters: two tensors, two scalars, two constexprs (signature order P, Q, n, scale, BLOCK, FLAG)."""

    arg_names = ["P", "Q", "n", "scale", "BLOCK", "FLAG"]
    __name__ = "fake_kernel"

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)

        return launch_


def test_first_call_binds_then_runner_gets_signature_order(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRETED", False)
    kernel = _FakeKernel()
    launcher = launch.KernelLauncher(kernel)
    # constexprs given out of signature order: the runner must still see them in signature order
    rec = launcher.record((4, 2), 2, (7, 0.5), {"FLAG": True, "BLOCK": 64}, num_warps=4, num_stages=2)
    assert rec.grid == (4, 2, 1)
    a, b = torch.zeros(1), torch.ones(1)
    launcher(rec, (a, b))
    launcher(rec, (b, a))
    first, second = kernel.log
    assert first[0] == "jit" and first[1] == (4, 2, 1) and first[2] == (a, b, 7, 0.5)
    assert first[3] == {"FLAG": True, "BLOCK": 64, "num_warps": 4, "num_stages": 2}
    assert second == ("runner", (4, 2, 1), (b, a, 7, 0.5, 64, True))


def test_interpreter_always_takes_the_normal_path(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRETED", True)
    kernel = _FakeKernel()
    launcher = launch.KernelLauncher(kernel)
    rec = launcher.record((1,), 2, (3, 1.0), {"BLOCK": 16, "FLAG": False}, num_warps=1, num_stages=1)
    for _ in range(2):
        launcher(rec, (torch.zeros(1), torch.zeros(1)))
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_record_missing_a_parameter_is_refused():
    launcher = launch.KernelLauncher(_FakeKernel())
    with pytest.raises(TypeError, match="FLAG"):
        launcher.record((1,), 2, (3, 1.0), {"BLOCK": 16}, num_warps=1, num_stages=1)


def test_tensor_key_separates_what_triton_specialises_on():
    base = torch.zeros(4, 8, dtype=torch.float16)
    assert launch.tensor_key(None) is None
    keys = {launch.tensor_key(t) for t in (base, base.t(), base.float(), base[:, 1:], base.reshape(8, 4))}
    assert len(keys) == 5  # strides, dtype, alignment (an offset view) and shape each change the key
    assert launch.tensor_key(base) == launch.tensor_key(torch.ones(4, 8, dtype=torch.float16))

