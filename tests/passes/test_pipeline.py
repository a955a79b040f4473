"""passes.pipeline and passes.infra: every pass is a torch.fx PassBase with its contract in code, pipelines
run under torch.fx's PassManager, configuration is bound when a pipeline is built, and a failure keeps
its own error type and names the failing pass together with the passes before it."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

import nesc
from helpers import StageNet, stage_net_inputs
from nesc.core import names
from nesc.core.errors import ConfigError, PassOrderError, PlanError
from nesc.passes import pipeline
from nesc.passes.find_weights import WEIGHT_OPS, FindWeights, weight_infos
from nesc.passes.pipeline import FREEZE, PASSES, TRANSFORM


def _captured() -> fx.GraphModule:
    return nesc.capture(StageNet(), stage_net_inputs())


@pytest.mark.parametrize("name", PASSES.names())
def test_every_registered_pass_is_a_pass_base_with_its_registry_name(name: str) -> None:
    cls = PASSES.get(name)
    assert issubclass(cls, PassBase) and cls.name == name


def test_pipelines_are_pass_managers_with_checks_after_each_pass() -> None:
    manager = pipeline.build(TRANSFORM, nesc.NESConfig())
    assert isinstance(manager, PassManager) and manager.run_checks_after_each_pass
    assert [type(p).name for p in manager.passes] == TRANSFORM
    assert [type(p).name for p in pipeline.build(FREEZE).passes] == FREEZE


def test_config_is_bound_when_the_pipeline_is_built() -> None:
    config = nesc.NESConfig(ratio=8)
    manager = pipeline.build(TRANSFORM, config)
    bound = [p.config for p in manager.passes if type(p).needs_config]
    assert len(bound) == 2 and all(c is config for c in bound)
    with pytest.raises(ConfigError, match="plan_pools.*needs a NESConfig"):
        pipeline.build(TRANSFORM)


def test_a_failing_pass_keeps_its_type_and_is_named_with_the_passes_before_it() -> None:
    gm = _captured()
    with pytest.raises(PassOrderError) as caught:
        pipeline.run(gm, ["functionalize", "epitomize"], nesc.NESConfig())
    assert names.PLAN in str(caught.value) and "plan_pools" in str(caught.value), "requires says what to run"
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "'Epitomize' pass after the following passes: ['Functionalize']" in notes


def test_an_error_raised_inside_a_pass_keeps_its_type() -> None:
    with pytest.raises(PlanError) as caught:  # the budget cannot be met: plan_pools' own error
        pipeline.run(_captured(), TRANSFORM, nesc.NESConfig(ratio=10_000))
    assert "'PlanPools' pass after the following passes: ['Functionalize', 'FindWeights']" in "\n".join(
        caught.value.__notes__)


def test_requires_refuses_a_graph_without_the_analysis_it_needs() -> None:
    gm = _captured()
    del gm.meta[names.INPUT_SPECS]
    with pytest.raises(PassOrderError, match="nesc.capture"):
        FindWeights()(gm)


def test_ensures_catches_a_pass_that_breaks_its_promise() -> None:
    class Forgetful(FindWeights):  # a find_weights that loses what it wrote
        def call(self, gm):
            result = super().call(gm)
            del gm.meta[names.DENSE_PARAMS]
            return result

    with pytest.raises(PassOrderError, match="did not leave the graph as it promises"):
        Forgetful()(_captured())


class EveryForm(nn.Module):
    """One weight per entry family of the table, reached through fx's function and method forms."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Parameter(torch.randn(4, 2, 3))
        self.c2 = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.lin = nn.Parameter(torch.randn(6, 4))
        self.mat = nn.Parameter(torch.randn(6, 5))
        self.meth = nn.Parameter(torch.randn(5, 3))
        self.bias = nn.Parameter(torch.randn(2))
        self.addmm_w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):  # (B, 2, 8)
        x = torch.conv1d(x, self.c1, padding=1)  # (B, 4, 8)
        x = torch.nn.functional.conv2d(x.unsqueeze(-1), self.c2).squeeze(-1).mean(-1)  # (B, 4)
        x = torch.nn.functional.linear(x, self.lin)  # (B, 6)
        x = torch.matmul(x, self.mat)  # (B, 5)
        x = x.matmul(self.meth)  # (B, 3)
        return torch.addmm(self.bias, x, self.addmm_w)  # (B, 2)


def test_the_weight_op_table_recognises_every_family_in_function_and_method_form() -> None:
    gm = nesc.capture(EveryForm(), (torch.randn(2, 2, 8),))
    found = {i.weight_name: (i.op, i.layout, i.shape) for i in weight_infos(FindWeights()(gm).graph_module)}
    assert found == {
        "c1": ("conv1d", "conv1d", (4, 2, 1, 3)),
        "c2": ("conv2d", "conv2d", (4, 4, 1, 1)),
        "lin": ("linear", "linear", (6, 4, 1, 1)),
        "mat": ("matmul", "linear_t", (5, 6, 1, 1)),
        "meth": ("matmul", "linear_t", (3, 5, 1, 1)),
        "addmm_w": ("matmul", "linear_t", (2, 3, 1, 1)),
    }
    assert {p.name: p.reason for p in gm.meta[names.DENSE_PARAMS]} == {"bias": "bias"}
    assert {"matmul", "__matmul__", "mm"} <= set(WEIGHT_OPS), "method forms are table entries"
