"""passes.functionalize: call_module Conv1d/Conv2d/Linear become functional calls on get_attr weights;
outputs are unchanged, other modules (and subclasses with their own forward) are left alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import nesc
from helpers import (
    EXACT,
    ShapeBranchNet,
    StageNet,
    assert_close,
    call_function_targets,
    call_modules_of,
    check_pass,
    graph_signature,
    run,
    stage_net_inputs,
)
from nesc.passes.functionalize import functionalize


def test_modules_become_functional_calls_on_get_attr_weights() -> None:
    torch.manual_seed(0)
    model, x = StageNet(), stage_net_inputs()
    gm = nesc.capture(model, x)
    assert len(call_modules_of(gm, nn.Conv2d)) == 3 and len(call_modules_of(gm, nn.Linear)) == 2

    gm = check_pass(functionalize(gm), modified=True)

    assert not call_modules_of(gm, nn.Conv2d) and not call_modules_of(gm, nn.Linear)
    assert call_modules_of(gm, nn.BatchNorm2d) and call_modules_of(gm, nn.Dropout), "other modules stay modules"
    targets = call_function_targets(gm)
    assert targets[F.conv2d] == 3 and targets[F.linear] == 2
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (F.conv2d, F.linear):
            w = node.args[1]
            assert w.op == "get_attr" and w.target.endswith(".weight")
            assert isinstance(gm.get_parameter(w.target), nn.Parameter)
            assert node.meta["nn_module_stack"], "the owning module is lost"
    assert_close(run(gm, x), run(model, x), EXACT, "eval")
    assert_close(run(gm, x, train=True, seed=1), run(model, x, train=True, seed=1), EXACT, "train")


def test_parameters_keep_their_names() -> None:
    model = StageNet()
    gm = check_pass(functionalize(nesc.capture(model, stage_net_inputs())), modified=True)
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]


class PaddedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(4, 4, 3, padding=(1, 2), padding_mode="circular", bias=False)
        self.grouped = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2)
        self.replicate1d = nn.Conv1d(8, 4, 3, padding=2, dilation=2, padding_mode="replicate")
        self.same = nn.Conv1d(4, 4, 5, padding="same")

    def forward(self, x):
        x = self.grouped(self.circular(self.reflect(x)))  # (B, 8, H/2, W/2+1)
        return self.same(self.replicate1d(x.flatten(2)))  # (B, 4, L)


def test_padding_modes_stride_dilation_groups_preserved() -> None:
    torch.manual_seed(0)
    model, x = PaddedConvs(), (torch.randn(2, 3, 8, 8),)
    gm = check_pass(functionalize(nesc.capture(model, x)), modified=True)
    assert F.pad in call_function_targets(gm), "non-zero padding modes pad explicitly"
    assert not call_modules_of(gm, nn.Conv2d) and not call_modules_of(gm, nn.Conv1d)
    assert_close(run(gm, x), run(model, x), EXACT, "padded convs")


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_with_its_own_forward_keeps_its_meaning() -> None:
    # fx traces through a user subclass (it is no leaf): its extra work must survive functionalize.
    model, x = nn.Sequential(ScaledConv(3, 4, 3), nn.Conv2d(4, 4, 1)), (torch.randn(1, 3, 6, 6),)
    gm = check_pass(functionalize(nesc.capture(model, x)), modified=True)
    assert not call_modules_of(gm, nn.Conv2d)
    assert_close(run(gm, x), run(model, x), EXACT, "subclass forward kept")


def test_leaf_subclass_is_not_inlined() -> None:
    # A leaf call_module of a Conv2d subclass may override forward: only exact types are inlined.
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, ScaledConv) or super().is_leaf_module(m, qualname)

    model, x = nn.Sequential(ScaledConv(3, 4, 3), nn.Conv2d(4, 4, 1)), (torch.randn(1, 3, 6, 6),)
    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    gm = check_pass(functionalize(gm), modified=True)
    assert len(call_modules_of(gm, ScaledConv)) == 1
    assert call_function_targets(gm)[F.conv2d] == 1
    assert_close(run(gm, x), run(model, x), EXACT, "subclass kept")


def test_export_graph_is_already_functional_and_untouched() -> None:
    gm = nesc.capture(ShapeBranchNet(), stage_net_inputs())
    before = graph_signature(gm)
    check_pass(functionalize(gm), modified=False)
    assert graph_signature(gm) == before


def test_second_run_changes_nothing() -> None:
    gm = check_pass(functionalize(nesc.capture(StageNet(), stage_net_inputs())), modified=True)
    before = graph_signature(gm)
    check_pass(functionalize(gm), modified=False)
    assert graph_signature(gm) == before
