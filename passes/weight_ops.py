"""The table of weight-bearing ops, and how to follow a weight back to the parameter it is computed from.

``WEIGHT_OPS``: op target -> ``WeightOp`` (family, index of the input activation, index of the weight,
how the weight is stored, and where the groups / transposed / bias arguments are), in both capture
forms (fx: functions and methods; export: aten overloads, every overload of each family). A new op
is added here and nowhere else; ``passes.find_weights`` describes what it finds, ``passes.reuse``
reads the same table.

``weight_sources`` follows an op's weight argument back through any computation that does not depend
on the model's inputs (a transpose, a slice of a packed parameter, weight standardisation, weight
norm, a reshape) to the parameters it reads: the sampled weight replaces that parameter and the
computation stays after it.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.nn import functional as F

from nesc.capture import node_arg
from nesc.core import names
from nesc.core.modules import REGENERATE, sampler_of

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightOp:
    """How one op target consumes a weight.

    family: ``conv`` (1-, 2- or 3-D, told by the weight's rank), ``conv_transpose``, ``linear``,
        ``matmul``, ``embedding`` (a lookup of rows) or ``einsum`` (operands in a list or varargs:
        ``input``/``weight`` are then unused, see ``match``).
    input / weight: argument indices of the activation and of the weight.
    stored: how the weight is stored: ``out_in`` ((O, I, ...): conv, linear, embedding) or ``in_out``
        (``x @ W``: W is (I, O); through a transpose it is (O, I) again; a transposed conv's (I, O/g, ...)).
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
# F.conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation)
_CONV_T = WeightOp("conv_transpose", 0, 1, "in_out", groups=6, bias=2)
_LINEAR = WeightOp("linear", 0, 1, "out_in", bias=2)
_MATMUL = WeightOp("matmul", 0, 1, "in_out")
_ADDMM = WeightOp("matmul", 1, 2, "in_out", bias=0)
_EMBED_F = WeightOp("embedding", 0, 1, "out_in")  # F.embedding(input, weight, ...)
_EMBED_ATEN = WeightOp("embedding", 1, 0, "out_in")  # aten.embedding(weight, indices, ...)
_EINSUM = WeightOp("einsum", -1, -1, "out_in")


def _overloads(packet) -> list:
    return [getattr(packet, name) for name in packet.overloads()]


# The one table of weight-bearing ops, in both capture forms (fx: functions and methods; export: aten).
# call_method targets are method names (strings); call_function targets are callables.
WEIGHT_OPS: dict[object, WeightOp] = {
    F.conv1d: _CONV, F.conv2d: _CONV, F.conv3d: _CONV, torch.conv1d: _CONV, torch.conv2d: _CONV, torch.conv3d: _CONV,
    **{op: _CONV for p in (aten.conv1d, aten.conv2d, aten.conv3d) for op in _overloads(p) if "out" not in str(op)},
    F.conv_transpose1d: _CONV_T, F.conv_transpose2d: _CONV_T, F.conv_transpose3d: _CONV_T,
    torch.conv_transpose1d: _CONV_T, torch.conv_transpose2d: _CONV_T, torch.conv_transpose3d: _CONV_T,
    **{op: _CONV_T for p in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
       for op in _overloads(p) if "out" not in str(op)},
    aten.convolution.default: WeightOp("conv", 0, 1, "out_in", groups=8, transposed=6, bias=2),
    F.linear: _LINEAR, aten.linear.default: _LINEAR,
    torch.matmul: _MATMUL, operator.matmul: _MATMUL, aten.matmul.default: _MATMUL, aten.mm.default: _MATMUL,
    torch.mm: _MATMUL, "matmul": _MATMUL, "__matmul__": _MATMUL, "mm": _MATMUL,
    torch.bmm: _MATMUL, aten.bmm.default: _MATMUL, "bmm": _MATMUL,
    aten.addmm.default: _ADDMM, torch.addmm: _ADDMM,
    F.embedding: _EMBED_F, torch.embedding: _EMBED_ATEN, aten.embedding.default: _EMBED_ATEN,
    torch.einsum: _EINSUM, aten.einsum.default: _EINSUM,
}
_TRANSPOSE_TARGETS = {aten.t.default, torch.t, torch.Tensor.t}


def lookup(node: fx.Node) -> WeightOp | None:
    """The ``WeightOp`` of a call node, or None (call_method targets are names, call_function ones callables)."""
    if node.op not in ("call_function", "call_method"):
        return None
    if isinstance(node.target, str) != (node.op == "call_method"):
        return None
    return WEIGHT_OPS.get(node.target)


def match(node: fx.Node, dependent: set[fx.Node]):
    """(input node, weight argument, WeightOp) if ``node`` is a weight-bearing op, else None.

    ``dependent``: the nodes that depend on the model's inputs (``input_dependent``); an einsum's
    weight is its one operand that does not."""
    op = lookup(node)
    if op is None:
        return None
    if op.family == "einsum":
        operands = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        fixed = [o for o in operands if isinstance(o, fx.Node) and o not in dependent]
        if len(operands) != 2 or len(fixed) != 1:
            return None  # a contraction of activations only, or of several parameters
        (w,) = fixed
        return next(o for o in operands if o is not w), w, op
    return node_arg(node, op.input, "input"), node_arg(node, op.weight, "weight"), op


def is_transposed_conv(node: fx.Node, op: WeightOp) -> bool:
    if op.family == "conv_transpose":
        return True
    return op.transposed is not None and bool(node_arg(node, op.transposed, "transposed", False))


def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a placeholder. A sampler or a regenerate node is a weight source
    even when a transformation learner feeds it the layer's input."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            out.add(node)
        elif not _is_sampled(gm, node) and any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _is_sampled(gm: fx.GraphModule, node: fx.Node) -> bool:
    return sampler_of(gm, node) is not None or (node.op == "call_function" and node.target is REGENERATE)


def is_transpose(node: fx.Node) -> bool:
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


@dataclass(frozen=True)
class Source:
    """The parameter (or sampler / regenerate node) a weight argument is computed from."""

    name: str  # the parameter's canonical name
    state: str  # dense | sampled | frozen
    node: fx.Node  # get_attr, sampler call or regenerate node: its shape is the parameter's
    chain: tuple[fx.Node, ...]  # the computation between it and the op (empty: read directly)

    @property
    def transposes(self) -> int | None:
        """How many transposes the chain is, or None when it computes more than a transpose."""
        return len(self.chain) if all(is_transpose(n) for n in self.chain) else None


def weight_source(gm: fx.GraphModule, w: object, canonical: dict[str, str], dependent: set[fx.Node]) -> Source | None:
    """The parameter behind the weight argument ``w``, or None if ``w`` is not computed from one.

    ``w`` may be any computation that does not depend on the inputs; of the parameters it reads, the
    largest (at least 2-D, and strictly larger than any other) is the weight (weight norm's ``v``,
    not its ``g``). A tied parameter is named by its first name in ``gm.named_parameters()``."""
    if not isinstance(w, fx.Node) or w in dependent:
        return None
    found: list[tuple] = []
    chain: list[fx.Node] = []
    stack, seen = [w], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        leaf = _leaf(gm, n, canonical)
        if leaf is not None:
            found.append(leaf)
        elif n.op != "get_attr":  # a buffer or constant: part of the computation
            chain.append(n)
            stack.extend(n.all_input_nodes)
    found = [f for f in found if f[0] >= 2]
    if not found:
        return None
    found.sort(key=lambda f: -f[1])
    if len(found) > 1 and found[1][1] == found[0][1] and found[1][2] != found[0][2]:
        return None  # two parameters of the same size: which one is the weight is a guess
    _, _, name, state, node = found[0]
    if len(chain) > 1:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        chain.sort(key=order.__getitem__)
    return Source(name, state, node, tuple(chain))


def _leaf(gm: fx.GraphModule, n: fx.Node, canonical: dict[str, str]):
    """(rank, numel, name, state, node) if ``n`` reads a parameter, a sampler or a frozen weight."""
    if n.op == "get_attr" and n.target in canonical:
        p = gm.get_parameter(n.target)
        return p.dim(), p.numel(), canonical[n.target], "dense", n
    sampler = sampler_of(gm, n)
    if sampler is not None:
        return 4, sampler.geometry.numel, sampler.weight_name, "sampled", n
    if n.op == "call_function" and n.target is REGENERATE:
        return 4, math.prod(n.args[4]), n.meta.get(names.SAMPLED_WEIGHT, n.name), "frozen", n
    return None


def view_of(family: str, shape: tuple[int, ...], transposes: int | None, stored: str):
    """(4-D view (O, I, kh, kw), layout) under which a parameter of ``shape`` is sampled, or None.

    Read directly by a matmul, the view follows the op ((I, O) stored: ``linear_t``); otherwise the
    parameter's own shape: 2-D ``linear``, 3-D ``conv1d``, 4-D ``conv2d``, and a 5-D or larger one as
    a ``conv2d`` view whose middle axes are merged; a batched matmul's (B, I, O) as one ``linear``
    (B * I, O) matrix (``epitomize`` reshapes a merged view back)."""
    if family == "matmul" and transposes is not None and len(shape) == 2:
        stored_out_in = (transposes % 2 == 1) == (stored == "in_out")
        return ((*shape, 1, 1), "linear") if stored_out_in else ((shape[1], shape[0], 1, 1), "linear_t")
    if len(shape) == 2:
        return (*shape, 1, 1), "linear"
    if family == "matmul" and len(shape) >= 3:  # a batch of (I, O) matrices (bmm): one (B * I, O) matrix
        return (math.prod(shape[:-1]), shape[-1], 1, 1), "linear"
    if len(shape) == 3:
        return (shape[0], shape[1], 1, shape[2]), "conv1d"
    if len(shape) == 4:
        return tuple(shape), "conv2d"
    if len(shape) >= 5:
        return (shape[0], shape[1], math.prod(shape[2:-1]), shape[-1]), "conv2d"
    return None


def madd_of(node: fx.Node, op: WeightOp, x_shape, w_shape, out_shape) -> int:
    """Multiply-adds of one weight-bearing op over the whole batch, from the shapes it consumes
    (``w_shape``: the weight as the op reads it, after any computation)."""
    out_numel, in_numel = math.prod(out_shape), math.prod(x_shape)
    if op.family == "embedding" or not w_shape:
        return 0  # a lookup
    if op.family == "conv":
        return out_numel * math.prod(w_shape[1:])
    if op.family == "conv_transpose" or is_transposed_conv(node, op):
        return in_numel * math.prod(w_shape[1:])  # every input element times one (O/g, k...) slice
    if op.family == "linear":
        return out_numel * w_shape[-1]
    if op.family == "matmul":
        return out_numel * (w_shape[-2] if len(w_shape) > 1 else 1)
    return out_numel * _contracted(node)


def _contracted(node: fx.Node) -> int:
    """An einsum's contracted size: the product of the sizes of the letters the output does not keep."""
    equation = node.args[0].replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    operands = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    sizes: dict[str, int] = {}
    for spec, operand in zip(inputs.split(","), operands):
        shape = _node_shape(operand)
        head, dots, tail = spec.partition("...")
        pairs = list(zip(head, shape)) + (list(zip(tail, shape[len(shape) - len(tail):])) if dots else [])
        sizes.update((letter, int(size)) for letter, size in pairs)
    if not arrow:  # implicit form: the letters seen once are kept
        letters = inputs.replace(",", "").replace("...", "")
        output = "".join(c for c in set(letters) if letters.count(c) == 1)
    return math.prod(size for letter, size in sizes.items() if letter not in output)


def _node_shape(node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else ()
