# INTERIM: replaced by the compiler half at merge.
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from nesc.backends.tvm.adapter import relax, tvm
from nesc.sampling import Geometry, regenerate_indexed

REGENERATE = torch.ops.nesc.regenerate.default


@dataclass(frozen=True)
class Lowered:
    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    input_names: tuple[str, ...]
    kinds: dict[str, str]


class _Indexed(fx.Interpreter):
    def call_function(self, target, args, kwargs):
        if target is REGENERATE:
            pool, starts, fracs, scale, shape, block, layout = args
            geometry = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)
            return regenerate_indexed(pool, starts, fracs, scale, geometry)
        return super().call_function(target, args, kwargs)


class _Wrapper(nn.Module):
    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *xs):
        if isinstance(self.gm, fx.GraphModule):
            return _Indexed(self.gm).run(*xs)
        return self.gm(*xs)


def _kind(name: str) -> str:
    if "nesc_pool" in name:
        return "pool"
    if "nesc_routes" in name:
        return "route"
    return "dense"


def lower(model: nn.Module | fx.GraphModule, example_inputs: tuple, *, dynamic_batch: bool = True) -> Lowered:
    import copy

    from tvm.relax.frontend.torch import from_exported_program

    wrapper = _Wrapper(copy.deepcopy(model)).eval()
    for module in wrapper.modules():  # buffers become inputs too, not constants
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                del module._buffers[key]
                module.register_parameter(key, nn.Parameter(buf, requires_grad=False))
    inputs = tuple(example_inputs)
    dynamic = None
    if dynamic_batch:
        inputs = tuple(x.expand(max(2, x.shape[0]), *x.shape[1:]).contiguous() for x in inputs)
        batch = torch.export.Dim("batch", min=1)
        dynamic = (tuple({0: batch} for _ in inputs),)
    with torch.no_grad():
        ep = torch.export.export(wrapper, inputs, dynamic_shapes=dynamic)
    for node in ep.graph_module.graph.nodes:  # TVM cannot legalize an int clamp to -inf; indices are >= 0
        if node.target is torch.ops.aten.clamp.default and len(node.args) > 1 and node.args[1] is None:
            node.args = (node.args[0], 0, *node.args[2:])
    mod = from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    n_in = len(inputs)
    names = [v.name for v in func.params]
    specs = [s for s in ep.graph_signature.input_specs if s.target is not None]
    by_arg = {s.arg.name: s.target.removeprefix("gm.") for s in specs}
    arrays = {}
    kinds = {}
    for var_name, value in zip(names[n_in:], params.get("main", [])):
        key = by_arg.get(var_name, var_name)
        arrays[key] = value.numpy()
        kinds[key] = _kind(key)
    return Lowered(mod, arrays, tuple(names[:n_in]), kinds)
