"""nesc.backends.tvm.importer_fixes: each pattern apache-tvm 0.27's torch importer mistranslates fails
with the importer alone, and compiles to torch's values with the fixes; the cases the importer gets
right go through its own converter (Funnel's relative positions: a descending arange broadcast
against the input, and an in-place product on an open-ended slice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm_adapter = pytest.importorskip("nesc.backends.tvm.adapter", reason="needs the tvm extra")

from nesc.backends.tvm import targets  # noqa: E402
from nesc.backends.tvm.adapter import from_exported_program, relax, tvm  # noqa: E402
from nesc.backends.tvm.importer_fixes import IMPORTER_FIXES  # noqa: E402

aten = torch.ops.aten
TARGET = targets.get_target("llvm").tvm_target()


class _DescendingPositions(nn.Module):
    """``x + arange(k, -k, -1)`` (broadcast: the importer's wrong length fails the build) and
    ``arange(0, 2k, 2)`` (a positive step: the importer's own converter)."""

    def forward(self, x):  # (B, 8)
        down = torch.arange(4, -4, -1)  # (8,): 4, 3, ..., -3
        return x + down + torch.arange(0, 16, 2)  # (B, 8)


class _ScaledOpenSlice(nn.Module):
    """``y[:, :3] *= 2`` as a captured graph holds it (``slice(y, 1, None, 3)``, an open start); torch.export
    functionalises it into ``slice_scatter(..., 1, None, 3)``. ``y[:, 3:5] += 1`` has closed bounds."""

    def forward(self, x):  # (B, 5)
        y = x.clone()
        aten.slice.Tensor(y, 1, None, 3).mul_(2.0)
        aten.slice.Tensor(y, 1, 3, 5).add_(1.0)
        return y


CASES = {"arange": (_DescendingPositions, "arange.start_step"),
         "slice_scatter": (_ScaledOpenSlice, "slice_scatter.default")}


def _exported(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model, (x,)).run_decompositions()


def _run(ep: torch.export.ExportedProgram, x: torch.Tensor, fixes: dict) -> np.ndarray:
    mod = from_exported_program(ep, custom_convert_map=fixes or None, run_ep_decomposition=False)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()  # main returns the outputs as a tuple


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_importer_alone_fails_on_the_pattern(case):
    """If this stops failing, apache-tvm fixed its converter: drop the entry from IMPORTER_FIXES."""
    cls, _ = CASES[case]
    x = torch.randn(2, 8 if case == "arange" else 5)
    with pytest.raises((ValueError, TypeError)):
        _run(_exported(cls().eval(), x), x, {})


@pytest.mark.parametrize("case", sorted(CASES))
def test_with_the_fixes_the_pattern_compiles_to_torchs_values(case):
    cls, op = CASES[case]
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(2, 8 if case == "arange" else 5)
    ep = _exported(model, x)
    assert any(getattr(n.target, "__name__", "") == op for n in ep.graph.nodes)  # the op the fix takes over
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_array_equal(_run(ep, x, IMPORTER_FIXES), want)  # integer offsets, * 2, + 1: exact
