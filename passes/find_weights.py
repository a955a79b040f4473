"""find_weights (analysis): find every weight-bearing op and describe its weight.

Recognises, in both capture forms, conv1d/conv2d (incl. depthwise and grouped), linear and
matmul/mm/addmm against a parameter (directly or through a transpose), and the weights nesc itself
produced: a trainable sampler (``call_module`` EpitomeSampler) or a frozen ``nesc.regenerate`` node.
Every parameter no such op consumes is listed with the reason it stays dense.

Which ops carry a weight is one table, ``WEIGHT_OPS``: target -> ``WeightOp`` (family, index of the
input activation, index of the weight, how the weight is stored, and where the groups / transposed /
bias arguments are). A new op is added there and nowhere else.

Requires: ``gm.meta[names.INPUT_SPECS]`` (written by ``nesc.capture``) for shape propagation.
Ensures: ``node.meta[names.WEIGHT]`` (a ``WeightInfo``) on each weight-bearing op and
``gm.meta[names.DENSE_PARAMS]``; the graph itself is untouched (``modified`` is False).

    before:  %conv2d = call_function[F.conv2d](%x, %w, %b, ...)
    after:   same node, meta[names.WEIGHT] = WeightInfo("layer1.0.conv1.weight", (64, 64, 3, 3), ...)
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from nesc.capture import ExportedBatchNorm, node_arg
from nesc.core import inputs, names
from nesc.core.modules import REGENERATE, is_gather_products, sampler_of, tensor_roles

from .infra import NescPass, PassResult, broken_promise, require_meta

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightOp:
    """How one op target consumes a weight.

    family: ``conv`` (1-D or 2-D, told by the weight's rank), ``linear`` or ``matmul``.
    input / weight: argument indices of the activation and of the weight.
    stored: how the weight is stored: ``out_in`` ((O, I, ...): conv, linear) or ``in_out``
        (``x @ W``: W is (I, O); through a transpose it is (O, I) again).
    groups / transposed / bias: argument indices (or None) of the conv groups, of the transposed flag
        (``aten.convolution``) and of the bias (for the report of what stays dense).
    """

    family: str
    input: int
    weight: int
    stored: str
    groups: int | None = None
    transposed: int | None = None
    bias: int | None = None


_CONV = WeightOp("conv", 0, 1, "out_in", groups=6, bias=2)
_LINEAR = WeightOp("linear", 0, 1, "out_in", bias=2)
_MATMUL = WeightOp("matmul", 0, 1, "in_out")
_ADDMM = WeightOp("matmul", 1, 2, "in_out", bias=0)

# The one table of weight-bearing ops, in both capture forms (fx: functions and methods; export: aten).
# call_method targets are method names (strings); call_function targets are callables.
WEIGHT_OPS: dict[object, WeightOp] = {
    F.conv1d: _CONV, F.conv2d: _CONV, torch.conv1d: _CONV, torch.conv2d: _CONV,
    aten.conv1d.default: _CONV, aten.conv2d.default: _CONV,
    aten.convolution.default: WeightOp("conv", 0, 1, "out_in", groups=8, transposed=6, bias=2),
    F.linear: _LINEAR, aten.linear.default: _LINEAR,
    torch.matmul: _MATMUL, operator.matmul: _MATMUL, aten.matmul.default: _MATMUL, aten.mm.default: _MATMUL,
    torch.mm: _MATMUL, "matmul": _MATMUL, "__matmul__": _MATMUL, "mm": _MATMUL,
    aten.addmm.default: _ADDMM, torch.addmm: _ADDMM,
}
_TRANSPOSE_TARGETS = {aten.t.default, torch.t, torch.Tensor.t}


@dataclass(frozen=True)
class WeightInfo:
    """One weight-bearing op's weight, as the planner and the report need it."""

    weight_name: str  # fully qualified parameter name in the user's model
    module_name: str  # the module that owns it ("" for the root)
    module_type: str  # class name of that module, for the report
    op: str  # conv2d | conv2d_dw | conv2d_group | conv1d | linear | matmul
    layout: str  # how the (O, I, kh, kw) view maps to the parameter: see nesc.core.sampling.LAYOUTS
    shape: tuple[int, int, int, int]  # (O, I, kh, kw)
    madd: int  # multiply-adds of the op per example
    in_shape: tuple[int, ...]  # the op's input activation, per example (batch dropped)
    channel_dim: int  # the input's channel axis (1 for conv, -1 for linear/matmul)
    order: int  # position among weight-bearing ops, in graph order
    state: str  # dense (a get_attr parameter) | sampled (EpitomeSampler) | frozen (nesc.regenerate)
    weight_node: str  # name of the node that produces the weight

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
    order = 0
    for node in gm.graph.nodes:
        node.meta.pop(names.WEIGHT, None)
        found = _match(gm, node)
        if found is None:
            continue
        x, w_node, op = found
        source = _weight_source(gm, w_node, canonical)
        if source is None:
            continue
        name, state, transposed, src = source
        info = _describe(gm, node, x, name, state, op, transposed, order, batch, src)
        if info is None:
            continue
        node.meta[names.WEIGHT] = info
        consumed.add(name)
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


def _match(gm: fx.GraphModule, node: fx.Node):
    """(input node, weight node, WeightOp) if ``node`` is a weight-bearing op, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    op = WEIGHT_OPS.get(node.target) if isinstance(node.target, str) == (node.op == "call_method") else None
    if op is None:
        return None
    if op.transposed is not None and node_arg(node, op.transposed, "transposed", False):
        return None  # transposed convolution: not a weight nesc samples; reported dense
    return node.args[op.input], node_arg(node, op.weight, "weight"), op


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _TRANSPOSE_TARGETS:
        return True
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in ("T", "mT"):
        return True
    if node.op == "call_function" and node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
        return True
    transpose_fn = node.op == "call_function" and node.target in (aten.transpose.int, torch.transpose)
    transpose_method = node.op == "call_method" and node.target == "transpose"
    if transpose_fn or transpose_method:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    return False


def _weight_source(gm: fx.GraphModule, w: object, canonical: dict[str, str]):
    """(qualified name, state, transposed, source node) of the parameter behind ``w``, or None if
    ``w`` is not one. A tied parameter is named by its first name in ``gm.named_parameters()``."""
    transposed = False
    while isinstance(w, fx.Node) and _is_transpose(w) and len(w.args) >= 1:
        transposed = not transposed
        w = w.args[0]
    if not isinstance(w, fx.Node):
        return None
    if w.op == "get_attr":
        if w.target in canonical:
            return canonical[w.target], "dense", transposed, w
        return None
    if sampler_of(gm, w) is not None:
        return sampler_of(gm, w).weight_name, "sampled", transposed, w
    if w.op == "call_function" and w.target is REGENERATE:
        return w.meta.get(names.SAMPLED_WEIGHT, w.name), "frozen", transposed, w
    return None


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


def _describe(gm, node, x, name, state, weight_op: WeightOp, transposed, order, batch, w_node) -> WeightInfo | None:
    """``w_node`` is the weight's source (get_attr, sampler or regenerate): its shape is the parameter's."""
    w_shape = tuple(_shape(w_node))
    x_shape = tuple(_shape(x)) if isinstance(x, fx.Node) else ()
    out_numel = _numel(_shape(node))
    family = weight_op.family
    if family == "conv":
        if len(w_shape) == 3:
            family, (O, I, k) = "conv1d", w_shape
            shape4, layout = (O, I, 1, k), "conv1d"
        elif len(w_shape) == 4:
            family, shape4, layout = "conv2d", w_shape, "conv2d"
        else:
            return None
        groups = node_arg(node, weight_op.groups, "groups", 1)
        in_ch = x_shape[1] if len(x_shape) > 1 else shape4[1]
        op = family
        if groups > 1:
            op = f"{family}_dw" if groups == in_ch and shape4[1] == 1 else f"{family}_group"
        channel_dim = 1
    else:
        if len(w_shape) != 2:
            return None  # matmul against a batched or 1-D parameter: not a weight matrix
        if family == "linear":
            (O, I), layout, op = w_shape, "linear", "linear"
        else:
            # x @ W: the parameter is stored (I, O); x @ W.t(): it is stored (O, I).
            stored_out_in = transposed == (weight_op.stored == "in_out")
            (O, I), layout, op = (w_shape, "linear", "matmul") if stored_out_in else (w_shape[::-1], "linear_t", "matmul")
        if family == "linear" and transposed:
            return None  # F.linear(x, W.t()): rare; leave dense rather than guess a layout
    if attr.target.rpartition(".")[2] in (names.FOLDED_SCALE, names.FOLDED_SHIFT):
        return "batch norm (folded: scale, shift)"  # passes.fold_batchnorm
        shape4 = (O, I, 1, 1)
        channel_dim = -1
    _, I, kh, kw = shape4
    madd = out_numel * I * kh * kw // max(batch, 1)
    module_name = name.rsplit(".", 1)[0] if "." in name else ""
    return WeightInfo(
        weight_name=name,
        module_name=module_name,
        module_type=_module_type(gm, node, module_name),
        op=op,
        layout=layout,
        shape=tuple(int(d) for d in shape4),
        madd=int(madd),
        in_shape=tuple(int(d) for d in x_shape[1:]),
        channel_dim=channel_dim,
        order=order,
        state=state,
        weight_node=w_node.name,
    )


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
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses.setdefault(node.target, set()).update(_use(gm, u, node) for u in node.users)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for pname, _ in mod.named_parameters():
                # Grouped by class, not instance, so the report has one line per kind of module.
                uses.setdefault(f"{node.target}.{pname}", set()).add(f"inside {type(mod).__name__} modules")
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


def _use(gm: fx.GraphModule, user: fx.Node, attr: fx.Node) -> str:
    """How ``user`` consumes the parameter ``attr``, in words."""
    op = WEIGHT_OPS.get(user.target) if user.op == "call_function" else None
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
    target = getattr(user.target, "__name__", None) or str(user.target)
    return f"input of {target}"
