"""find_weights (analysis): find every weight-bearing op and describe its weight.

Recognises, in both capture forms, every overload of conv1d/2d/3d (incl. depthwise, grouped and
string padding), transposed convs, linear, matmul/mm/bmm/addmm/einsum against a parameter and
embedding lookups, and the weights nesc itself produced: a trainable sampler (``call_module``
EpitomeSampler) or a frozen ``nesc.regenerate`` node. The weight may be computed from the parameter
by anything that does not depend on the inputs (a transpose, a slice of a packed attention
projection, weight standardisation, weight norm): the parameter is the weight and the computation
stays after it (``weight_ops.weight_source``). Every parameter no such op consumes is listed with
the reason it stays dense.

Which ops carry a weight is one table, ``weight_ops.WEIGHT_OPS``: target -> ``WeightOp``. A new op is
added there and nowhere else.

Requires: ``gm.meta[names.INPUT_SPECS]`` (written by ``nesc.capture``) for shape propagation.
Ensures: ``node.meta[names.WEIGHT]`` (a ``WeightInfo``) on each weight-bearing op and
``gm.meta[names.DENSE_PARAMS]``; the graph itself is untouched (``modified`` is False).

    before:  %conv2d = call_function[F.conv2d](%x, %w, %b, ...)
    after:   same node, meta[names.WEIGHT] = WeightInfo("layer1.0.conv1.weight", (64, 64, 3, 3), ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from nesc.capture import ExportedBatchNorm, node_arg
from nesc.core import inputs, names
from nesc.core.modules import is_gather_products, tensor_roles

from .infra import NescPass, PassResult, broken_promise, require_meta
from .weight_ops import WEIGHT_OPS, WeightOp, input_dependent, is_transposed_conv, madd_of, match, view_of, weight_source

__all__ = ["WEIGHT_OPS", "WeightOp", "WeightInfo", "DenseParam", "FindWeights", "find_weights", "weight_infos",
           "weight_nodes", "canonical_names", "aliases"]


@dataclass(frozen=True)
class WeightInfo:
    """One weight-bearing op's weight, as the planner and the report need it."""

    weight_name: str  # fully qualified parameter name in the user's model
    module_name: str  # the module that owns it ("" for the root)
    module_type: str  # class name of that module, for the report
    # conv1d|2d|3d (+ _dw | _group) | conv_transpose1d|2d|3d | linear | matmul | embedding | einsum
    op: str
    layout: str  # how the (O, I, kh, kw) view maps to the parameter: see nesc.core.sampling.LAYOUTS
    shape: tuple[int, int, int, int]  # (O, I, kh, kw)
    madd: int  # multiply-adds of the op per example
    in_shape: tuple[int, ...]  # the op's input activation, per example (batch dropped)
    channel_dim: int  # the input's channel axis (1 for conv, -1 for linear/matmul)
    order: int  # position among weight-bearing ops, in graph order
    state: str  # dense (a get_attr parameter) | sampled (EpitomeSampler) | frozen (nesc.regenerate)
    weight_node: str  # name of the node that produces the weight
    computed: str = ""  # the ops between the parameter and the op ("" when read directly), e.g. "split, getitem"

    @property
    def numel(self) -> int:
        O, I, kh, kw = self.shape
        return O * I * kh * kw

    @property
    def kernel(self) -> str:
        return f"{self.shape[2]}x{self.shape[3]}"


@dataclass(frozen=True)
class DenseParam:
    """A parameter that no compressible op consumes, and why."""

    name: str
    numel: int
    reason: str


class FindWeights(NescPass):
    name = "find_weights"

    def requires(self, gm: fx.GraphModule) -> None:
        require_meta(gm, names.INPUT_SPECS, self.name, "nesc.capture(model, example_inputs)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        return _find_weights(gm)

    def ensures(self, gm: fx.GraphModule) -> None:
        if names.DENSE_PARAMS not in gm.meta:
            raise broken_promise(self.name, f"gm.meta[{names.DENSE_PARAMS!r}] was not written")


def find_weights(gm: fx.GraphModule) -> PassResult:
    """``FindWeights()(gm)``: the pass as a plain function."""
    return FindWeights()(gm)


def _find_weights(gm: fx.GraphModule) -> PassResult:
    _propagate_shapes(gm)
    batch = _batch_size(gm)
    consumed: set[str] = set()
    canonical = canonical_names(gm)
    dependent = input_dependent(gm)
    order = 0
    for node in gm.graph.nodes:
        node.meta.pop(names.WEIGHT, None)
        found = match(node, dependent)
        if found is None:
            continue
        x, w_arg, op = found
        source = weight_source(gm, w_arg, canonical, dependent)
        if source is None:
            continue
        info = _describe(gm, node, x, w_arg, op, source, order, batch)
        if info is None:
            continue
        node.meta[names.WEIGHT] = info
        consumed.add(source.name)
        order += 1
    gm.meta[names.DENSE_PARAMS] = _dense_params(gm, consumed)
    return PassResult(gm, False)


def weight_infos(gm: fx.GraphModule) -> list[WeightInfo]:
    """The WeightInfos find_weights left on ``gm``, in graph order."""
    return [n.meta[names.WEIGHT] for n in gm.graph.nodes if names.WEIGHT in n.meta]


def weight_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if names.WEIGHT in n.meta]


def _propagate_shapes(gm: fx.GraphModule) -> None:
    was = gm.training
    gm.eval()  # shape propagation must not move batch-norm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs.from_specs(gm.meta[names.INPUT_SPECS], fill="zeros"))
    finally:
        gm.train(was)


def _batch_size(gm: fx.GraphModule) -> int:
    specs = gm.meta[names.INPUT_SPECS]
    return specs[0][0][0] if specs and specs[0][0] else 1


def canonical_names(gm: fx.GraphModule) -> dict[str, str]:
    """Every name of every parameter -> the name ``gm.named_parameters()`` lists it under."""
    first = {id(p): name for name, p in gm.named_parameters()}
    return {name: first[id(p)] for name, p in gm.named_parameters(remove_duplicate=False)}


def aliases(canonical: dict[str, str]) -> dict[str, list[str]]:
    """Inverse of ``canonical_names``: each parameter's canonical name -> all its names."""
    out: dict[str, list[str]] = {}
    for name, first in canonical.items():
        out.setdefault(first, []).append(name)
    return out


def _describe(gm, node, x, w_arg, weight_op: WeightOp, source, order: int, batch: int) -> WeightInfo | None:
    """``source.node`` is the weight's source (get_attr, sampler or regenerate): its shape is the
    parameter's; ``w_arg`` is the weight as the op reads it (after any computation)."""
    view = view_of(weight_op.family, _shape(source.node), source.transposes, weight_op.stored)
    if view is None:
        return None  # a 1-D or scalar parameter: a scale, not a weight matrix
    shape4, layout = view
    x_shape = tuple(_shape(x)) if isinstance(x, fx.Node) else ()
    w_shape = tuple(_shape(w_arg))
    madd = madd_of(node, weight_op, x_shape, w_shape, _shape(node))
    module_name = source.name.rsplit(".", 1)[0] if "." in source.name else ""
    return WeightInfo(
        weight_name=source.name,
        module_name=module_name,
        module_type=_module_type(gm, node, module_name),
        op=_op_kind(node, weight_op, x_shape, w_shape),
        layout=layout,
        shape=tuple(int(d) for d in shape4),
        madd=int(madd // max(batch, 1)),
        in_shape=tuple(int(d) for d in x_shape[1:]),
        channel_dim=1 if weight_op.family.startswith("conv") else -1,
        order=order,
        state=source.state,
        weight_node=source.node.name,
        computed=", ".join(_op_label(n) for n in source.chain) if source.transposes is None else "",
    )


def _op_kind(node: fx.Node, weight_op: WeightOp, x_shape, w_shape) -> str:
    """conv2d, conv2d_dw, conv1d_group, conv_transpose2d, linear, matmul, embedding, einsum."""
    if not weight_op.family.startswith("conv"):
        return weight_op.family
    dims = max(len(w_shape) - 2, 1)
    if is_transposed_conv(node, weight_op):
        return f"conv_transpose{dims}d"
    family = f"conv{dims}d"
    groups = node_arg(node, weight_op.groups, "groups", 1)
    if isinstance(groups, int) and groups > 1:
        in_ch = x_shape[1] if len(x_shape) > 1 else None
        return f"{family}_dw" if groups == in_ch and w_shape[1] == 1 else f"{family}_group"
    return family


def _op_label(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target.rsplit(".", 1)[-1]
    name = getattr(node.target, "__name__", None) or str(node.target)
    return name.split(".")[0]


def _shape(node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if tm is None or not hasattr(tm, "shape"):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return tuple(val.shape) if val is not None and hasattr(val, "shape") else ()
    return tuple(tm.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _module_type(gm: fx.GraphModule, node: fx.Node, module_name: str) -> str:
    types = gm.meta.get(names.MODULE_TYPES, {})
    if module_name in types:
        return types[module_name].__name__
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in stack.values():
        if path == module_name:
            return cls.rsplit(".", 1)[-1] if isinstance(cls, str) else cls.__name__
    return "-"


def _dense_params(gm: fx.GraphModule, consumed: set[str]) -> list[DenseParam]:
    """Every parameter outside the weights found, with the reason it stays dense."""
    uses: dict[str, set[str]] = {}
    dependent = input_dependent(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses.setdefault(node.target, set()).update(_use(gm, u, node, dependent) for u in node.users)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for pname, _ in mod.named_parameters():
                # Grouped by class, not instance, so the report has one line per kind of module.
                uses.setdefault(f"{node.target}.{pname}", set()).add(f"inside {type(mod).__name__} modules{_why_opaque(mod)}")
    names_of = aliases(canonical_names(gm))  # tied parameters: one tensor, several names
    own = tensor_roles(gm)  # nesc's pools, start indices, learners: reported by the plan, not here
    out = []
    for name, p in gm.named_parameters():
        all_names = names_of[name]
        if any(n in consumed or n in own for n in all_names):
            continue
        how = set().union(*(uses.get(n, set()) for n in all_names))
        reason = "; ".join(sorted(how)) if how else "not used by the graph"
        out.append(DenseParam(name, p.numel(), reason))
    return out


def _why_opaque(mod) -> str:
    """Why capture kept a module whose weight nesc could otherwise sample opaque, for the reason."""
    if isinstance(mod, torch.nn.Embedding) and mod.max_norm is not None:
        return " with max_norm (the lookup renormalises the table in place)"
    if isinstance(mod, torch.nn.Embedding) and mod.sparse:
        return " with sparse=True (sparse gradients need the table as a parameter)"
    return ""


def _use(gm: fx.GraphModule, user: fx.Node, attr: fx.Node, dependent: set[fx.Node]) -> str:
    """How ``user`` consumes the parameter ``attr``, in words (``dependent``: ``input_dependent(gm)``)."""
    op = WEIGHT_OPS.get(user.target) if user.op == "call_function" else None
    if op is not None and op.family in ("embedding", "einsum"):
        op = None
    if op is not None and op.bias is not None:
        if node_arg(user, op.bias, "bias" if op.family != "matmul" else "input") is attr:
            return "bias"
        if op.family != "matmul":
            return f"non-parameter use in {user.name}"
    if is_gather_products(user) and len(user.args) > 3 and user.args[3] is attr:
        return "bias"  # passes.reuse moved the op's bias after its product map
    if user.op == "call_module":
        mod = gm.get_submodule(user.target)
        return "batch norm" if isinstance(mod, ExportedBatchNorm) else f"input of {type(mod).__name__}"
    if attr.target.rpartition(".")[2] in (names.FOLDED_SCALE, names.FOLDED_SHIFT):
        return "batch norm (folded: scale, shift)"  # passes.fold_batchnorm
    target = getattr(user.target, "__name__", None) or str(user.target)
    if any(a in dependent for a in user.all_input_nodes if a is not attr):
        # A position embedding or class token: added to (or concatenated with) the activations.
        return f"used with activations by {target}, not read by a conv, linear, matmul or embedding"
    return f"input of {target}"
