"""The JSON codec for fx graphs: values, nodes, call targets and the call signature, both ways.

An artifact's ``graph`` header entry is ``{"nodes": [...], "codegen": {...}}``. Each node is
``{op, name, target, args, kwargs, meta}``; JSON-native values (None, bool, int, finite float, str,
list) stay as they are, every other value becomes a one-key object ``{"$tag": payload}`` (``$node``,
``$tuple``, ``$dict``, ``$float`` for inf/nan, ``$slice``, ``$ellipsis``, ``$device``, ``$dtype``,
``$layout``, ``$memory_format``). ``codegen`` is ``{"kind": "flat"}`` or the pytree signature of an
exported graph (``orig_args``, and the input and output tree specs as ``treespec_dumps`` text).

Decoding is where a file from anyone meets code generation, so it is a schema check as much as a
decoder: every name that ends up in generated Python (node names, attribute paths, argument names)
must be an identifier, only the node kinds nesc writes are accepted, and call targets resolve only to
torch op overloads and an explicit allow-list of arithmetic functions (``PY_FUNCTIONS``). A malformed
file raises ``Invalid``, which the loader turns into an ``ArtifactError`` naming the file.

This module is the bottom of ``nesc.serialize``: it imports no other module of the package.
"""

from __future__ import annotations

import keyword
import math
import operator
from typing import Any

import torch
from torch import fx

from nesc.core import compat, names
from nesc.core.errors import ArtifactError

# Node meta that survives a save: which weight a regenerate node samples, the module path of every
# node (reports, backends), and the cumulative-average flag of batch norms.
KEPT_META = (names.SAMPLED_WEIGHT, "nn_module_stack", names.BN_CUMULATIVE)
# The module torch.export attaches to check input shapes: Python code, not data (never written).
GUARDS = "_guards_fn"
# The Python callables an exported graph may call (symbolic-shape arithmetic, getitem on multi-output
# ops), by name. An explicit list, not "anything in operator": operator.attrgetter / methodcaller /
# call would let a crafted file reach arbitrary Python.
PY_FUNCTIONS = {
    f"operator.{n}": getattr(operator, n)
    for n in "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor "
    "not_ invert lshift rshift".split()
}
PY_FUNCTIONS |= {f"math.{n}": getattr(math, n) for n in dir(math) if callable(getattr(math, n)) and n[0] != "_"}
PY_FUNCTIONS |= {f"torch.{n}": getattr(torch, n) for n in dir(torch) if n.startswith(("sym_", "_sym_"))}
_PY_NAMES = {id(fn): name for name, fn in PY_FUNCTIONS.items()}
_ENUMS = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}
_NODE_OPS = ("placeholder", "get_attr", "call_function", "output")


class Invalid(Exception):
    """A graph or tensor description that does not follow the schema; the loader names the file."""


class Unencodable(Exception):
    """A node or value of a graph being saved that has no JSON form."""


# ------------------------------------------------------------------------------- names in code


def identifier(a: str) -> bool:
    return a.isidentifier() and not keyword.iskeyword(a)


def check_name(name) -> None:
    if not (isinstance(name, str) and identifier(name)):
        raise Invalid(f"{name!r} is not a Python identifier")


def check_path(path) -> None:
    # Paths and names are pasted into generated Python code: only identifiers (and the digits of
    # nn.Sequential children, which fx writes as getattr(m, "0")) may pass.
    atoms = path.split(".") if isinstance(path, str) else [None]
    if not all(isinstance(a, str) and (identifier(a) or (a.isascii() and a.isdigit())) for a in atoms):
        raise Invalid(f"{path!r} is not a dotted path of Python identifiers")


# ----------------------------------------------------------------------------------- encoding


def encode_graph(graph: fx.Graph, tensor_names) -> dict:
    """{"nodes": [{op, name, target, args, kwargs, meta}, ...], "codegen": ...}; lists all failures at once."""
    nodes, problems = [], []
    for node in graph.nodes:
        if node.op == "call_module" and node.target == GUARDS and not node.users:
            continue  # export's input-shape check: Python code, see the package docstring
        try:
            if node.op == "get_attr":
                _check_encodable_attr(node, tensor_names)
            nodes.append(_encode_node(node))
        except Unencodable as e:
            problems.append(f"{node.op} {node.name}: {e}")
    if problems:
        raise ArtifactError(
            f"cannot save: {len(problems)} node(s) of the exported graph cannot be written as data:\n  "
            + "\n  ".join(problems)
            + "\nnesc artifacts hold aten/custom ops (torch.ops.<ns>.<op>.<overload>), operator/math "
            "functions and plain constants. Replace these calls in the model, or register them as torch "
            "custom ops (torch.library.custom_op) so export keeps them as single op nodes."
        )
    return {"nodes": nodes, "codegen": _encode_codegen(graph)}


def _describe(target) -> str:
    if isinstance(target, compat.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    return target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))


def _encode_node(node: fx.Node) -> dict:
    if node.op in ("placeholder", "get_attr", "output"):
        target = node.target
    elif node.op == "call_function":
        target = _encode_target(node.target)
    else:
        raise Unencodable(f"{node.op} nodes are not supported; only aten-level call_function graphs are")
    entry: dict[str, Any] = {"op": node.op, "name": node.name, "target": target}
    if node.args:
        entry["args"] = encode(list(node.args))
    if node.kwargs:
        entry["kwargs"] = {k: encode(v) for k, v in node.kwargs.items()}
    kept = {k: encode(_plain_meta(k, node.meta[k])) for k in KEPT_META if k in node.meta}
    if kept:
        entry["meta"] = kept
    return entry


def _encode_target(fn) -> str:
    if compat.is_op_overload(fn):
        namespace, opname, overload = compat.op_overload_name(fn)
        return f"{namespace}::{opname}.{overload}"  # e.g. aten::conv2d.default
    if id(fn) in _PY_NAMES:
        return _PY_NAMES[id(fn)]
    raise Unencodable(f"target {_describe(fn)} is not a torch op overload or an operator/math function")


def _check_encodable_attr(node: fx.Node, tensor_names) -> None:
    if node.target not in tensor_names:
        raise Unencodable(f"get_attr of {node.target!r}, which is not a tensor (a higher-order op's subgraph?)")


def _plain_meta(key: str, value):
    if key == "nn_module_stack":  # {key: (path, type)}; some torch versions keep the type object itself
        return {str(k): tuple(x if isinstance(x, str) else _type_name(x) for x in v) for k, v in value.items()}
    return value


def _type_name(x) -> str:
    return f"{x.__module__}.{x.__qualname__}" if isinstance(x, type) else str(x)


def encode(v):
    """Python value -> JSON. JSON-native scalars stay; the rest become {"$tag": payload}."""
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$float": repr(v)}  # 'inf', '-inf', 'nan'
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, tuple):
        return {"$tuple": [encode(x) for x in v]}
    if isinstance(v, dict):
        return {"$dict": [[encode(k), encode(x)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"$slice": [encode(v.start), encode(v.stop), encode(v.step)]}
    if v is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    for tag, kind in _ENUMS.items():
        if isinstance(v, kind):
            return {tag: str(v).removeprefix("torch.")}
    raise Unencodable(f"argument {v!r} of type {type(v).__name__} has no JSON form")


def _encode_codegen(graph: fx.Graph) -> dict:
    info = compat.pytree_codegen_info(graph)
    if info is None:
        return {"kind": "flat"}
    orig_args, in_spec, out_spec = info
    try:
        specs = {k: compat.treespec_dumps(s) if s is not None else None for k, s in
                 (("in_spec", in_spec), ("out_spec", out_spec))}
    except Exception as e:  # noqa: BLE001 - pytree raises several types for unregistered nodes
        raise ArtifactError(
            f"cannot save: the model's inputs/outputs use a container pytree cannot serialise ({e}). "
            f"Return tensors, tuples, lists or dicts, or register the type with "
            f"torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)."
        ) from e
    return {"kind": "pytree", "orig_args": list(orig_args), **specs}


# ----------------------------------------------------------------------------------- decoding


def decode_graph(doc: dict, table: dict, path: str) -> fx.Graph:
    """The fx graph of a ``graph`` document whose get_attr nodes read the tensors of ``table``.

    Raises ``Invalid`` for a malformed document and ``ArtifactError`` (listing them all) for call
    targets that do not resolve in this process.
    """
    nodes = doc["nodes"]
    for i, entry in enumerate(nodes):
        _check_node(i, entry, table)
    targets = _resolve_targets(nodes, path)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in nodes:
        node = _decode_node(graph, entry, targets, env)
        env[node.name] = node
    graph.set_codegen(_decode_codegen(doc.get("codegen", {"kind": "flat"}), path))
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises RuntimeError with the reason
        raise Invalid(f"graph fails lint: {e}") from e
    return graph


def _resolve_targets(nodes: list[dict], path: str) -> dict[str, Any]:
    """{node name: callable} of every call_function node; every unresolved target is listed at once."""
    targets, unresolved = {}, []
    for entry in nodes:
        if entry["op"] == "call_function":
            try:
                targets[entry["name"]] = _resolve_target(entry["target"])
            except LookupError as e:
                unresolved.append(f"node {entry['name']}: {e}")
    if unresolved:
        raise ArtifactError(
            f"{path}: {len(unresolved)} operator(s) in the graph do not resolve in this process:\n  "
            + "\n  ".join(unresolved)
            + "\nImport the library that registers them before nesc.load (nesc's own ops are registered by "
            "nesc.core.modules), or load with the torch version that wrote the file."
        )
    return targets


def _decode_node(graph: fx.Graph, entry: dict, targets: dict, env: dict[str, fx.Node]) -> fx.Node:
    op, name = entry["op"], entry["name"]
    try:
        args = tuple(decode(entry.get("args", []), env))
        kwargs = {k: decode(v, env) for k, v in entry.get("kwargs", {}).items()}
        node_meta = {k: decode(v, env) for k, v in entry.get("meta", {}).items() if k in KEPT_META}
    except (TypeError, ValueError, RuntimeError) as e:  # a malformed payload under a valid tag
        raise Invalid(f"node {name}: malformed value ({type(e).__name__}: {e})") from e
    node = graph.create_node(op, targets.get(name, entry["target"]), args, kwargs, name=name)
    if node.name != name:
        raise Invalid(f"node name {name!r} is used twice")
    node.meta.update(node_meta)
    return node


def _check_node(i: int, entry, table: dict) -> None:
    if not isinstance(entry, dict) or not {"op", "name", "target"} <= entry.keys():
        raise Invalid(f"node #{i} must be an object with op, name and target")
    op, name, target = entry["op"], entry["name"], entry["target"]
    check_name(name)  # node names become variables of the generated forward
    if not isinstance(target, str) or not isinstance(entry.get("args", []), list):
        raise Invalid(f"node {name}: target must be a string and args a list")
    if not isinstance(entry.get("kwargs", {}), dict) or not isinstance(entry.get("meta", {}), dict):
        raise Invalid(f"node {name}: kwargs and meta must be objects")
    if op not in _NODE_OPS:
        raise Invalid(f"node {name}: op {op!r} is not one nesc writes")
    if op == "placeholder":
        check_name(target)
    if op == "get_attr" and target not in table:
        raise Invalid(f"node {name}: get_attr of {target!r}, which is not a stored tensor")


def _resolve_target(text: str):
    if "::" in text:
        namespace, _, rest = text.partition("::")
        opname, _, overload = rest.rpartition(".")
        try:
            fn = getattr(getattr(getattr(torch.ops, namespace), opname), overload)
        except (AttributeError, RuntimeError) as e:
            raise LookupError(f"unknown operator {text!r}") from e
        if not compat.is_op_overload(fn):
            raise LookupError(f"{text!r} is not an operator overload")
        return fn
    if text in PY_FUNCTIONS:
        return PY_FUNCTIONS[text]
    raise LookupError(
        f"unknown function {text!r} (nesc reads torch ops and the arithmetic of operator, math, torch.sym_*)"
    )


def decode(v, env: dict[str, fx.Node]):
    """JSON -> Python value; ``$node`` references resolve in ``env`` (nodes defined before this one)."""
    if isinstance(v, list):
        return [decode(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise Invalid(f"value {v!r} is not a tagged value")
    (tag, payload), = v.items()
    if tag == "$node":
        if payload not in env:
            raise Invalid(f"reference to node {payload!r}, which is not defined before its use")
        return env[payload]
    if tag == "$tuple":
        return tuple(decode(x, env) for x in payload)
    if tag == "$dict":
        return {decode(k, env): decode(x, env) for k, x in payload}
    if tag == "$float":
        return float(payload)
    if tag == "$slice":
        return slice(*(decode(x, env) for x in payload))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$device":
        return torch.device(payload)
    if tag in _ENUMS:
        value = getattr(torch, str(payload), None)
        if not isinstance(value, _ENUMS[tag]):
            raise Invalid(f"{payload!r} is not a torch {tag[1:]}")
        return value
    raise Invalid(f"unknown value tag {tag!r}")


def _decode_codegen(doc, path: str) -> fx.graph.CodeGen:
    if not isinstance(doc, dict) or doc.get("kind") not in ("flat", "pytree"):
        raise Invalid(f"codegen {doc!r} is neither flat nor pytree")
    if doc["kind"] == "flat":
        return fx.graph.CodeGen()
    orig_args = doc.get("orig_args", [])
    for a in orig_args:
        check_name(a)
    try:
        specs = [compat.treespec_loads(doc[k]) if doc.get(k) else None for k in ("in_spec", "out_spec")]
    except Exception as e:  # noqa: BLE001 - pytree raises several types
        raise ArtifactError(
            f"{path}: the model's input/output structure cannot be rebuilt ({e}). If it uses a custom "
            f"container, import the module that registers it with torch.utils._pytree before nesc.load."
        ) from e
    return compat.make_pytree_codegen(orig_args, *specs)
