"""functionalize: inline ``call_module`` Conv1d/Conv2d/Linear into functional calls on get_attr weights.

Why: every later pass sees one form. symbolic_trace keeps ``nn.Conv2d`` as an opaque call_module,
while torch.export already gives ``aten.conv2d(x, get_attr weight, ...)``. After this pass a weight is
always a ``get_attr`` node feeding a functional op, which is what the rewrite pass replaces.

Requires: nothing. Ensures: no ``call_module`` of an exact Conv1d/Conv2d/Linear is left; outputs
unchanged (same functional calls the modules make); modules keep their parameters (under the same
names) but are no longer called.

    before:  %conv1 = call_module[conv1](%x)
    after:   %w = get_attr[conv1.weight]; %b = get_attr[conv1.bias]
             %conv1 = call_function[F.conv2d](%x, %w, %b, stride, padding, dilation, groups)
"""

from __future__ import annotations

from torch import fx, nn
from torch.nn import functional as F

from nesc.core import compat

from .infra import NescPass, PassResult, broken_promise

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}
# The module types this pass inlines (exact types only: a subclass may override forward).
INLINED = (nn.Conv1d, nn.Conv2d, nn.Linear)


class Functionalize(NescPass):
    name = "functionalize"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in _inlinable(gm):
            _inline(gm, node, gm.get_submodule(node.target))
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in _inlinable(gm)]
        if left:
            raise broken_promise(self.name, f"modules still called as modules: {left[:5]}")


def functionalize(gm: fx.GraphModule) -> PassResult:
    """``Functionalize()(gm)``: the pass as a plain function."""
    return Functionalize()(gm)


def _inlinable(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) in INLINED]


def _inline(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> None:
    graph = gm.graph
    (x,) = node.args
    with graph.inserting_before(node):
        w = graph.get_attr(f"{node.target}.weight")
        b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
        if isinstance(mod, nn.Linear):
            new = graph.call_function(F.linear, (x, w, b))
        else:
            if mod.padding_mode != "zeros":
                # nn.ConvNd pads explicitly first and convolves with zero padding.
                x = graph.call_function(F.pad, (x, compat.conv_padding_for_pad(mod)), {"mode": mod.padding_mode})
                padding = 0
            else:
                padding = mod.padding
            new = graph.call_function(
                _CONV[type(mod)], (x, w, b, mod.stride, padding, mod.dilation, mod.groups)
            )
    new.meta = dict(node.meta)
    new.meta.setdefault("nn_module_stack", {node.target: (node.target, type(mod))})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
