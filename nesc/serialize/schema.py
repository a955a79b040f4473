"""The schema an artifact must follow before any of it becomes a module: names, values, the header
documents, and the facts the graph's tensors must agree with.

torch.fx turns a graph into Python source and runs it, so everything from a file that reaches that
source is checked here first: node names, placeholder and keyword-argument names must be identifiers
(not keywords, not ``self``). Tensor names are data: the tensor table accepts every name torch
accepts (dotted paths of non-empty atoms; ``block1-0``, ``a b``, ``1``), and ``tensors.install_tensors``
registers them through ``nn.Module``'s own checks, so a name that clashes with an attribute of the
module (``graph``, ``forward``, ``training``, ``__class__``) is refused, never overwritten. The paths
that get_attr nodes read reach the source: fx writes an identifier atom as ``m.atom`` and any other
as ``getattr(m, "atom")``, so there an atom must be a non-keyword identifier, or printable text
without a quote or a backslash (which could end that string). Every other value reaches the source
through ``repr`` (strings, numbers) or as an object (ops, dtypes), never as text.

After the module is assembled, ``check_routes`` proves every routing map fits its pool (dtype, shape,
every start inside the pool, every fraction in [0, 1]) so no kernel can index out of bounds, and
``check_mutations`` that in-place ops only write into tensors the graph computed itself.
Every failure raises ``Invalid`` with what is wrong and where; the loader names the file.
"""

from __future__ import annotations

import keyword
import math
import operator
import re

import torch
from torch import fx

from nesc.capture import ExportedBatchNorm, ModeDropout
from nesc.core import compat, inputs
from nesc.core.modules import GATHER_ARGS, REGENERATE_ARGS, is_gather_products, is_regenerate
from nesc.core.quant import PoolRead, is_dequantize, pool_problem, pool_read
from nesc.core.sampling import LAYOUTS, Geometry

MAX_DEPTH = 32  # nesting of values and documents: exported graphs use 3-4
MAX_INPUT_ELEMENTS = 1 << 31  # per recorded input spec (checked under fake tensors, never allocated)
_RESERVED = {"self"}
_TABLE_KEYS = {"kind": str, "requires_grad": bool, "persistent": bool, "stride": list, "alias_of": str}
_KINDS = ("parameter", "buffer", "constant")
_DEVICES = re.compile(r"(cpu|cuda|meta)(:[0-9]{1,3})?")


class Invalid(Exception):
    """A graph or tensor description that does not follow the schema; the loader names the file."""


# ---------------------------------------------------------------------------------------- names

def identifier(a) -> bool:
    return isinstance(a, str) and a.isidentifier() and not keyword.iskeyword(a) and a not in _RESERVED


def check_name(name, what: str = "name") -> str:
    if not identifier(name):
        raise Invalid(f"{what} {name!r} is not a Python identifier (letters, digits, _; not a keyword)")
    return name


def safe_atom(a) -> bool:
    """An attribute name fx may write into source: a non-keyword identifier (``m.a``), or printable text
    without a quote or backslash (``getattr(m, "a")``: nothing in it can end the string)."""
    if not (isinstance(a, str) and a):
        return False
    if a.isidentifier():
        return not keyword.iskeyword(a)
    return a.isprintable() and '"' not in a and "\\" not in a


def check_path(path, what: str = "tensor path") -> str:
    """A name torch accepts for a parameter, buffer or submodule path: dotted, no atom empty. Data only:
    where a path reaches generated code, ``check_code_path`` applies as well."""
    if not (isinstance(path, str) and path and all(path.split("."))):
        raise Invalid(f"{what} {path!r} is not a dotted path of non-empty names")
    return path


def check_code_path(path, what: str = "attribute path") -> str:
    """A path fx writes into the generated forward (a get_attr target): every atom ``safe_atom``."""
    check_path(path, what)
    bad = [a for a in path.split(".") if not safe_atom(a)]
    if bad:
        raise Invalid(f"{what} {path!r} cannot be written into the module's code: {bad[0]!r} is a Python keyword, "
                      f"or holds a quote, a backslash or a non-printable character")
    return path


def check_type(value, kind, what: str):
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise Invalid(f"{what} must be {name}, got {type(value).__name__}")
    return value


def check_depth(value, what: str, depth: int = 0) -> None:
    """Reject documents nested deeper than ``MAX_DEPTH`` before anything recurses over them."""
    if depth > MAX_DEPTH:
        raise Invalid(f"{what} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for v in value.values():
            check_depth(v, what, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_depth(v, what, depth + 1)


# ------------------------------------------------------------------------------- header documents

def check_table(table) -> dict:
    """The ``tensors`` document: {path: {kind, requires_grad?, persistent?, stride?, alias_of?}}."""
    check_type(table, dict, "the tensor table")
    for name, entry in table.items():
        check_path(name)
        check_type(entry, dict, f"tensor table entry {name!r}")
        for key, value in entry.items():
            if key not in _TABLE_KEYS:
                raise Invalid(f"tensor table entry {name!r} has unknown key {key!r}")
            check_type(value, _TABLE_KEYS[key], f"tensor {name!r}: {key}")
        if entry.get("kind") not in _KINDS:
            raise Invalid(f"tensor {name!r} has kind {entry.get('kind')!r}; expected one of {_KINDS}")
        if "alias_of" in entry:
            check_path(entry["alias_of"])
    return table


def check_specs(specs) -> list[tuple[tuple[int, ...], str]]:
    """The ``input_specs`` document: JSON ``[[shape list, dtype name], ...]`` holding what
    ``nesc.core.inputs.check_specs`` accepts, each input of at most ``MAX_INPUT_ELEMENTS``."""
    check_type(specs, list, "input_specs")
    for entry in specs:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)):
            raise Invalid(f"input spec {entry!r} is not a [shape, dtype] pair with the shape a list")
    out = inputs.check_specs(specs, "input_specs", Invalid)
    for shape, _ in out:
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise Invalid(f"input spec shape {shape!r} holds more than 2^31 elements")
    return out


def check_extra(extra) -> dict:
    """The caller's ``extra`` dict; the keys nesc itself reads must have their types."""
    check_type(extra, dict, "extra")
    reasons = extra.get("dense_reasons", {})
    check_type(reasons, dict, "extra['dense_reasons']")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in reasons.items()):
        raise Invalid("extra['dense_reasons'] must map weight names to reasons (strings)")
    if extra.get("config") is not None:
        check_type(extra["config"], str, "extra['config']")
    return extra


def check_device(text) -> str:
    if not (isinstance(text, str) and _DEVICES.fullmatch(text)):
        raise Invalid(f"device {text!r} is not cpu, cuda[:N] or meta")
    return text


# ----------------------------------------------------------------------------- assembled module

def check_routes(gm: fx.GraphModule) -> None:
    """Every ``nesc.regenerate`` node reads a pool and a routing map that fit each other, every
    ``nesc.gather_products`` node a product map that fits the op it reads, and every ``nesc.dequantize``
    node stored values (and scales) of the dtypes and shapes its form needs (``quant.pool_problem``)."""
    for node in gm.graph.nodes:
        if is_regenerate(node):
            _check_route(gm, node)
        elif is_gather_products(node):
            _check_products(gm, node)
        elif is_dequantize(node):
            _pool(gm, node, f"dequantize node {node.name}")


def _check_products(gm: fx.GraphModule, node: fx.Node) -> None:
    where = f"gather_products node {node.name}"
    if len(node.args) != len(GATHER_ARGS) or node.kwargs:
        raise Invalid(f"{where}: takes {GATHER_ARGS} positionally")
    products, starts, fracs, bias, dim, channels, block, rows = node.args
    starts, fracs = (_stored(gm, arg, f"{where}: {role}") for arg, role in ((starts, "starts"), (fracs, "fracs")))
    if bias is not None:
        _stored(gm, bias, f"{where}: bias")
    check_type(dim, int, f"{where}: dim")
    check_ints([channels, block, rows], 3, f"{where}: channels, block, rows")
    # The products come from one op whose weight is regenerated with ``groups * rows`` output rows.
    args = products.args if isinstance(products, fx.Node) else ()
    weights = [a for a in args if isinstance(a, fx.Node) and is_regenerate(a)]
    if len(weights) != 1 or not isinstance(weights[0].args[4], list) or not weights[0].args[4]:
        raise Invalid(f"{where}: its products must be one op whose weight a nesc.regenerate node builds")
    groups = weights[0].args[4][0] // rows
    nrows = -(-channels // block)
    if starts.dtype != torch.int32 or tuple(starts.shape) != (nrows, 2):
        raise Invalid(f"{where}: starts are {starts.dtype} {tuple(starts.shape)}, expected int32 {(nrows, 2)}")
    if not fracs.is_floating_point() or tuple(fracs.shape) != (nrows,):
        raise Invalid(f"{where}: fractions are {fracs.dtype} {tuple(fracs.shape)}, expected float {(nrows,)}")
    g, o = starts.unbind(-1)
    if bool((starts < 0).any()) or bool((g >= groups).any()) or bool((o >= rows).any()):
        raise Invalid(f"{where}: a (group, row) start lies outside its {groups} group(s) of {rows} products")
    if not bool(((fracs >= 0) & (fracs <= 1)).all()):  # also false for NaN
        raise Invalid(f"{where}: interpolation fractions must lie in [0, 1]")


def _check_route(gm: fx.GraphModule, node: fx.Node) -> None:
    where = f"regenerate node {node.name}"
    if len(node.args) != len(REGENERATE_ARGS) or node.kwargs:
        raise Invalid(f"{where}: takes {REGENERATE_ARGS} positionally")
    pool, starts, fracs, scale, shape, block, layout = node.args
    pool = _pool(gm, pool, where)
    starts, fracs = (_stored(gm, arg, f"{where}: {role}") for arg, role in ((starts, "starts"), (fracs, "fracs")))
    scale = _stored(gm, scale, f"{where}: scale")
    if not scale.is_floating_point() or scale.shape != () or not bool(torch.isfinite(scale)):
        raise Invalid(f"{where}: scale is {scale.dtype} of shape {tuple(scale.shape)}, expected a finite float "
                      f"scalar (shape ())")
    if layout not in LAYOUTS:
        raise Invalid(f"{where}: layout {layout!r} must be one of {LAYOUTS}")
    check_ints(shape, 4, f"{where}: shape")
    check_ints(block, 2, f"{where}: block")
    if pool.dim() != 4:
        raise Invalid(f"{where}: the pool has shape {tuple(pool.shape)}, expected 4 dimensions")
    try:
        g = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)
    except ValueError as e:
        raise Invalid(f"{where}: {e}") from None
    grid = (*g.grid, 4)
    if starts.dtype != torch.int32 or tuple(starts.shape) != grid:
        raise Invalid(f"{where}: starts are {starts.dtype} {tuple(starts.shape)}, expected int32 {grid}")
    if not fracs.is_floating_point() or tuple(fracs.shape) != grid:
        raise Invalid(f"{where}: fractions are {fracs.dtype} {tuple(fracs.shape)}, expected float {grid}")
    upper = torch.tensor(g.start_max, dtype=torch.int32)
    if bool((starts < 0).any()) or bool((starts > upper).any()):
        raise Invalid(f"{where}: a start index lies outside its pool {g.pool} (limits {upper.tolist()})")
    if not bool(((fracs >= 0) & (fracs <= 1)).all()):  # also false for NaN
        raise Invalid(f"{where}: interpolation fractions must lie in [0, 1]")


def _pool(gm: fx.GraphModule, arg, where: str) -> torch.Tensor:
    """The stored pool ``arg`` reads: a get_attr, or a ``nesc.dequantize`` of stored int8 values and scales
    or float16 / bfloat16 values (``nesc.core.quant``), checked (``pool_problem``)."""
    read = pool_read(arg)
    if read is None and isinstance(arg, fx.Node) and is_dequantize(arg):
        raise Invalid(f"{where}: nesc.dequantize takes (values, scale or None, dtype) positionally, its values "
                      f"and scales read from stored tensors (get_attr), got {arg.args} {arg.kwargs}")
    read = read or PoolRead(arg)
    values = _stored(gm, read.values, f"{where}: pool")
    scales = None if read.scale is None else _stored(gm, read.scale, f"{where}: pool scale")
    problem = pool_problem(read, values, scales)
    if problem:
        raise Invalid(f"{where}: {problem}")
    return values


def _stored(gm: fx.GraphModule, arg, what: str) -> torch.Tensor:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise Invalid(f"{what} must be read from a stored tensor (get_attr)")
    value = attribute(gm, arg.target)
    if not isinstance(value, torch.Tensor):
        raise Invalid(f"{what}: {arg.target!r} is not a tensor")
    return value


def attribute(gm: fx.GraphModule, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return obj


def check_ints(value, n: int, what: str) -> None:
    if not (isinstance(value, list) and len(value) == n and all(type(d) is int and d > 0 for d in value)):
        raise Invalid(f"{what} must be {n} positive ints, got {value!r}")


def check_train_mode(gm: fx.GraphModule) -> None:
    """What only training mode reads, which the load's check run (eval mode) cannot exercise: a dropout's
    probability in [0, 1], a batch norm's momentum in [0, 1] (or None, cumulative) and its step counter an
    int64 scalar that it increments."""
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        where = f"node {node.name}"
        if isinstance(mod, ModeDropout) and not (type(mod.p) in (int, float) and 0 <= mod.p <= 1):
            raise Invalid(f"{where}: dropout probability {mod.p!r} must lie in [0, 1]")
        if not isinstance(mod, ExportedBatchNorm):
            continue
        m = mod.momentum
        if m is not None and not (type(m) in (int, float) and 0 <= m <= 1):
            raise Invalid(f"{where}: batch-norm momentum {m!r} must lie in [0, 1] (or be None)")
        if len(node.args) > 5 and node.args[5] is not None:
            steps = _stored(gm, node.args[5], f"{where}: num_batches_tracked")
            if steps.dtype != torch.int64 or steps.shape != ():
                raise Invalid(f"{where}: num_batches_tracked is {steps.dtype} {tuple(steps.shape)}, expected an int64 "
                              f"scalar")


def check_mutations(gm: fx.GraphModule) -> None:
    """An op that writes into an argument may only write into a tensor the graph computed itself:
    never into an input (the caller's tensor) nor into a stored tensor (the model)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not compat.is_op_overload(node.target):
            continue
        written = compat.mutated_arguments(node.target)
        if not written:
            continue
        names = compat.argument_names(node.target)
        for name in written:
            index = names.index(name)
            arg = node.args[index] if index < len(node.args) else node.kwargs.get(name)
            root = _alias_root(gm, arg)
            if not (isinstance(root, fx.Node) and root.op in ("call_function", "call_module")):
                raise Invalid(f"node {node.name} ({node.target}) writes into {getattr(arg, 'name', arg)!r}, "
                              f"which is (a view of) an input or a stored tensor, not one the graph computed")


def _alias_root(gm: fx.GraphModule, value):
    """Follow ``value`` back through ops whose output may alias their first input (views, ``to``,
    ``contiguous``, ``getitem`` of ``split``, eval-mode dropout modules) to where its memory comes from."""
    for _ in range(len(gm.graph.nodes) + 1):
        if not isinstance(value, fx.Node) or not value.args:
            return value
        if value.op == "call_function":
            aliases = value.target is operator.getitem or (
                compat.is_op_overload(value.target) and compat.returns_alias(value.target))
        else:  # our mode-aware modules: dropout returns its input unchanged in eval mode
            aliases = value.op == "call_module" and isinstance(gm.get_submodule(value.target), ModeDropout)
        if not aliases:
            return value
        value = value.args[0]
    return value
