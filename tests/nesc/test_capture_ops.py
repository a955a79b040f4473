"""nesc.capture_ops: the ops capture rewrites (fresh allocations, lifted constants, attribute
transposes) leave no op outside the artifact allow-list, change no output, and keep the model saveable
(WavLM's ``torch.empty`` biases, DeBERTa-v2's ``torch.tensor`` scale, Falcon's ``self.weight.T``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn

import nesc
from helpers import EXACT, assert_close
from nesc.capture_ops import ALLOCATIONS, LIFTED, exported_as_pure, transposes_as_permutes
from nesc.serialize import ops

aten = torch.ops.aten


class _FreshTensors(nn.Module):
    """Allocates with ``torch.empty`` / ``empty_like`` / ``new_empty`` (never read) and builds a
    constant with ``torch.tensor`` inside forward; ``if x.shape[-1] > 1`` sends symbolic_trace to export
    when ``branch`` is set."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.linear = nn.Linear(32, 32)

    def forward(self, x):  # (B, S, 32)
        if self.branch and x.shape[-1] > 1:
            x = x * 1.0
        scale = torch.sqrt(torch.tensor(32.0))  # export: a lifted constant, copied (lift_fresh_copy)
        h = self.linear(x) / scale
        # Three empty tensors (0 elements: their sums are 0 and read nothing), from the three spellings.
        none = torch.empty(x.size(0) * 0) + torch.empty_like(x[:0]).sum() + x.new_empty(x.size(0) * 0).sum()
        return h + none.sum()


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}


@pytest.mark.parametrize("branch,path", [(True, "export"), (False, "symbolic_trace")])
def test_captured_graphs_hold_no_empty_or_lifted_copy(branch: bool, path: str) -> None:
    torch.manual_seed(0)
    model, x = _FreshTensors(branch).eval(), torch.randn(2, 5, 32)
    gm = nesc.capture(model, (x,))
    assert gm.meta["nesc_capture"] == path
    targets = _targets(gm)
    assert not targets & (set(ALLOCATIONS) | set(LIFTED) | {torch.empty, torch.empty_like, "new_empty"})
    with torch.no_grad():
        assert_close(gm(x), model(x), EXACT, "capture")


def test_the_rewrites_retarget_and_drop_layout_only_arguments() -> None:
    """``empty.memory_format`` takes ``memory_format``; ``zeros`` does not: it is dropped, the rest kept."""
    ep = torch.export.export(_FreshTensors(True).eval(), (torch.randn(2, 5, 32),))
    gm = torch.fx.GraphModule(ep.module(), ep.module().graph)
    before = _targets(gm)
    assert aten.lift_fresh_copy.default in before and aten.empty.memory_format in before
    assert exported_as_pure(gm) is True
    after = _targets(gm)
    assert aten.zeros.default in after and aten.clone.default in after
    assert not after & (set(ALLOCATIONS) | set(LIFTED))
    for node in gm.graph.nodes:
        if node.target is aten.zeros.default:
            assert "memory_format" not in node.kwargs and node.kwargs.get("device") == torch.device("cpu")
    assert exported_as_pure(gm) is False  # nothing left


def test_a_model_with_fresh_tensors_saves_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _FreshTensors(True).eval(), torch.randn(2, 5, 32)
    frozen = nesc.freeze(nesc.transform(model, (x,), ratio=2, min_params=100))
    nesc.save(frozen, tmp_path / "m.nesc")
    loaded = nesc.load(tmp_path / "m.nesc")
    calls = {ops.packet_name(n.target) for n in loaded.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "_schema")}
    assert calls <= ops.ALLOWED_OPS and "aten::empty" not in calls
    with torch.no_grad():
        assert_close(loaded(x), frozen(x), EXACT, "save/load")


class _AttributeTransposes(nn.Module):
    """Falcon's ``input @ self.weight.T``, and the other attribute spellings of a transpose (``.mT``,
    ``.H``, ``.mH``, ``.adjoint()``), which export keeps as their own ops; ``if x.shape[-1] > 1`` sends
    symbolic_trace to export."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(48, 32) / 6) for _ in range(5))

    def forward(self, x):  # (B, S, 32)
        if x.shape[-1] > 1:
            x = x * 1.0
        a, b, c, d, e = self.weights  # each (48, 32): (O, I) read as x @ W^T
        return x @ a.T + x @ b.mT + x @ c.H + x @ d.mH + x @ e.adjoint()  # (B, S, 48)


def test_attribute_transposes_become_permutes_that_find_weights_reads() -> None:
    torch.manual_seed(0)
    model, x = _AttributeTransposes().eval(), torch.randn(2, 5, 32)
    ep = torch.export.export(model, (x,))
    kept = {aten.numpy_T.default, aten.mT.default, aten.mH.default, aten.adjoint.default, aten.matrix_H.default}
    assert kept & _targets(ep.module())  # the ops the rule exists for (this torch keeps them)
    gm = nesc.capture(model, (x,))
    assert gm.meta["nesc_capture"] == "export"
    assert not _targets(gm) & kept
    with torch.no_grad():
        assert_close(gm(x), model(x), EXACT, "capture")
    # Each weight is found behind one transpose: sampled in the op's (O, I) view.
    from nesc.passes.find_weights import find_weights, weight_infos

    infos = weight_infos(find_weights(gm).graph_module)
    assert sorted(i.weight_name for i in infos) == [f"weights.{k}" for k in range(5)]
    assert {(i.shape, i.layout, i.computed) for i in infos} == {((48, 32, 1, 1), "linear", "")}


def test_the_transpose_rule_keeps_complex_conjugations_and_bad_ranks() -> None:
    """``mH`` conjugates a complex tensor (not a permute), and ``matrix_H`` of a 3-D tensor is an error
    the op must keep raising."""
    graph = fx.Graph()
    z, t = graph.placeholder("z"), graph.placeholder("t")
    z.meta["val"] = torch.zeros(3, 4, dtype=torch.complex64)
    t.meta["val"] = torch.zeros(2, 3, 4)
    graph.output((graph.call_function(aten.mH.default, (z,)), graph.call_function(aten.matrix_H.default, (t,))))
    gm = fx.GraphModule(nn.Module(), graph)
    assert transposes_as_permutes(gm) is False
    assert _targets(gm) == {aten.mH.default, aten.matrix_H.default}


def test_a_model_reading_weight_dot_t_saves_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _AttributeTransposes().eval(), torch.randn(2, 5, 32)
    frozen = nesc.freeze(nesc.transform(model, (x,), ratio=2, min_params=100))
    nesc.save(frozen, tmp_path / "m.nesc")
    loaded = nesc.load(tmp_path / "m.nesc")
    with torch.no_grad():
        assert_close(loaded(x), frozen(x), EXACT, "save/load")
