"""nesc.serialize.tensors: the tensor table keeps tied weights tied, layouts, non-persistent buffers and
cumulative batch norms through a save and a load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nesc.serialize import load, save
from nesc.serialize.tensors import collect_tensors, install_tensors, is_dense, without_aliases
from serialize_cases import assert_same_tensors, traced


def test_tied_noncontiguous_sequential_and_cumulative_bn(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 6))  # the path a.0.weight has a digit atom
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a[0].weight  # tied: stored once, tied again after load
            self.t = nn.Parameter(torch.randn(4, 6).t())  # non-contiguous (6, 4)
            self.bn = nn.BatchNorm1d(4, momentum=None)  # cumulative average

        def forward(self, x):
            return self.bn(self.b(self.a(x)) @ self.t)

    gm = traced(Tied(), shape=(3, 6))
    save(gm, tmp_path / "m.nesc")
    loaded = load(tmp_path / "m.nesc")
    assert loaded.get_parameter("a.0.weight") is loaded.b.weight
    assert loaded.t.stride() == gm.t.stride() == (1, 6)  # the layout comes back, not just the values
    assert_same_tensors(gm, loaded)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), gm.eval()(x))
    (bn,) = [m for m in loaded.modules() if hasattr(m, "momentum") and hasattr(m, "eps")]
    assert bn.momentum is None


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.arange(3.0))
        self.register_buffer("scratch", torch.ones(3), persistent=False)


def test_non_persistent_buffers_stay_non_persistent_under_every_name():
    root = nn.Module()
    root.a = _Holder()
    root.b = root.a  # one module under two names: both paths are listed, the second as an alias
    tensors, table = collect_tensors(root)
    assert table["a.scratch"] == {"kind": "buffer", "persistent": False}
    assert table["b.scratch"] == {"kind": "buffer", "persistent": False, "alias_of": "a.scratch"}
    assert table["a.kept"] == {"kind": "buffer"}
    assert set(without_aliases(tensors, table)) == {"a.kept", "a.scratch"}
    rebuilt = nn.Module()
    install_tensors(rebuilt, without_aliases(tensors, table), table)
    assert set(rebuilt.state_dict()) == set(root.state_dict()) == {"a.kept", "b.kept"}
    assert rebuilt.b.scratch.data_ptr() == rebuilt.a.scratch.data_ptr()  # still one tensor


@pytest.mark.parametrize(
    "make, dense",
    [
        (lambda: torch.zeros(4, 6), True),
        (lambda: torch.zeros(4, 6).t(), True),
        (lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
        (lambda: torch.zeros(4, 6)[:, ::2], False),  # gaps
        (lambda: torch.zeros(1, 6).expand(4, 6), False),  # overlap (stride 0)
    ],
    ids=["contiguous", "transposed", "channels_last", "strided-slice", "expanded"],
)
def test_is_dense(make, dense):
    t = make()
    assert is_dense(t.shape, t.stride()) is dense
