"""The JSON codec for fx graphs: values, nodes, call targets and the call signature, both ways.

An artifact's ``graph`` header entry is ``{"nodes": [...], "codegen": {...}}``. Each node is
``{op, name, target, args, kwargs, meta}``; JSON-native values (None, bool, int, finite float, str,
list) stay as they are, every other value becomes a one-key object ``{"$tag": payload}`` (``$node``,
``$tuple``, ``$dict``, ``$float`` for inf/nan, ``$slice``, ``$ellipsis``, ``$device``, ``$dtype``,
``$layout``, ``$memory_format``). ``codegen`` is ``{"kind": "flat"}`` or the pytree signature of an
exported graph (``orig_args``, and the input and output tree specs, ``trees``: a type the loading
process does not know comes back as a plain dict or tuple, with a warning).

Decoding is where a file from anyone meets code generation, so it is a schema check as much as a
decoder: every name that ends up in generated Python (node names, argument names) must be an
identifier and every attribute path one fx writes safely (``schema.check_code_path``), only the node kinds nesc writes are accepted, and call targets resolve only to
torch op overloads and an explicit allow-list of arithmetic functions (``PY_FUNCTIONS``). A malformed
file raises ``Invalid``, which the loader turns into an ``ArtifactError`` naming the file.

This module is the bottom of ``nesc.serialize``: it imports no other module of the package.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from nesc.core import compat, names
from nesc.core.errors import ArtifactError

from . import ops, schema, trees
from .schema import Invalid

# Node meta that survives a save: which weight a regenerate node samples, the module path of every
# node (reports, backends), and the cumulative-average flag of batch norms.
KEPT_META = (names.SAMPLED_WEIGHT, "nn_module_stack", names.BN_CUMULATIVE)
# The module torch.export attaches to check input shapes: Python code, not data (never written).
GUARDS = "_guards_fn"
_ENUMS = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_module", "output")  # call_module: format 5
_NODE_KEYS = {"op", "name", "target", "args", "kwargs", "meta"}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class Unencodable(Exception):
    """A node or value of a graph being saved that has no JSON form."""


# ----------------------------------------------------------------------------------- encoding


def encode_graph(graph: fx.Graph, tensor_names, modules=()) -> dict:
    """{"nodes": [{op, name, target, args, kwargs, meta}, ...], "codegen": ...}; lists all failures at once.
    ``modules``: the paths of the trainable modules (``trainable``) that call_module nodes may call."""
    nodes, problems = [], []
    for node in graph.nodes:
        if node.op == "call_module" and node.target == GUARDS and not node.users:
            continue  # export's input-shape check: Python code, see the package docstring
        try:
            if node.op == "get_attr":
                _check_encodable_attr(node, tensor_names)
            nodes.append(_encode_node(node, modules))
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


def _encode_node(node: fx.Node, modules=()) -> dict:
    if node.op in ("placeholder", "get_attr", "output") or node.op == "call_module" and node.target in modules:
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
    if id(fn) in ops.PY_NAMES:
        return ops.PY_NAMES[id(fn)]
    raise Unencodable(f"target {_describe(fn)} is not a torch op overload or an allowed operator/math function")


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
        specs = {k: trees.encode_spec(s) if s is not None else None for k, s in
                 (("in_spec", in_spec), ("out_spec", out_spec))}
    except Exception as e:  # noqa: BLE001 - pytree raises several types for unregistered nodes
        raise ArtifactError(
            f"cannot save: the model's inputs/outputs use a container pytree cannot serialise ({e}). "
            f"Return tensors, tuples, lists or dicts, or register the type with "
            f"torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)."
        ) from e
    return {"kind": "pytree", "orig_args": list(orig_args), **specs}


# ----------------------------------------------------------------------------------- decoding


def decode_graph(doc, table: dict, path: str, modules=()) -> fx.Graph:
    """The fx graph of a ``graph`` document whose get_attr nodes read the tensors of ``table`` and whose
    call_module nodes call the trainable modules ``modules`` (paths; none in a frozen model's file).

    Raises ``Invalid`` for anything off the schema and ``ArtifactError`` (listing them all) for call
    targets that are unknown or not allowed (``ops``).
    """
    schema.check_type(doc, dict, "the graph document")
    nodes = schema.check_type(doc.get("nodes"), list, "graph['nodes']")
    for i, entry in enumerate(nodes):
        _check_node(i, entry, table, modules)
    if not nodes or nodes[-1]["op"] != "output" or sum(e["op"] == "output" for e in nodes) != 1:
        raise Invalid("a graph has exactly one output node, and it comes last")
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
    """{node name: callable} of every call_function node; every refused target is listed at once."""
    targets, refused = {}, []
    for entry in nodes:
        if entry["op"] == "call_function":
            try:
                targets[entry["name"]] = ops.resolve(entry["target"])
            except LookupError as e:
                refused.append(f"node {entry['name']}: {e}")
    if refused:
        raise ArtifactError(
            f"{path}: {len(refused)} call(s) in the graph are not allowed or not known in this process:\n  "
            + "\n  ".join(refused[:20]) + ("\n  ..." if len(refused) > 20 else "")
            + "\nnesc artifacts may call only the pure ops of nesc.serialize.ops (nesc's own op is registered "
            "by nesc.core.modules). A file that calls anything else was not written by nesc.save, or by a nesc "
            "or torch with other ops: re-save it with this one."
        )
    return targets


def _decode_node(graph: fx.Graph, entry: dict, targets: dict, env: dict[str, fx.Node]) -> fx.Node:
    op, name = entry["op"], entry["name"]
    try:
        args = tuple(decode(entry.get("args", []), env))
        kwargs = {k: decode(v, env) for k, v in entry.get("kwargs", {}).items()}
        node_meta = _decode_meta(entry.get("meta", {}), env, name)
    except (TypeError, ValueError, RuntimeError) as e:  # a malformed payload under a valid tag
        raise Invalid(f"node {name}: malformed value ({type(e).__name__}: {e})") from e
    node = graph.create_node(op, targets.get(name, entry["target"]), args, kwargs, name=name)
    if node.name != name:
        raise Invalid(f"node name {name!r} is used twice or reserved by torch.fx (it named it {node.name!r})")
    node.meta.update(node_meta)
    return node


def _decode_meta(meta: dict, env: dict, name: str) -> dict:
    out = {}
    for key, value in meta.items():
        if key not in KEPT_META:
            continue
        value = decode(value, env)
        if key == "nn_module_stack":
            ok = isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, tuple) and all(isinstance(x, str) for x in v)
                for k, v in value.items())
        else:
            ok = isinstance(value, str if key == names.SAMPLED_WEIGHT else bool)
        if not ok:
            raise Invalid(f"node {name}: meta[{key!r}] has the wrong type ({type(value).__name__})")
        out[key] = value
    return out


def _check_node(i: int, entry, table: dict, modules=()) -> None:
    if not isinstance(entry, dict) or not {"op", "name", "target"} <= entry.keys() <= _NODE_KEYS:
        raise Invalid(f"node #{i} must be an object with op, name, target (and args, kwargs, meta only)")
    op, name, target = entry["op"], entry["name"], entry["target"]
    schema.check_name(name, f"node #{i}'s name")  # node names become variables of the generated forward
    if op not in _NODE_OPS:
        raise Invalid(f"node {name}: op {op!r} is not one nesc writes ({', '.join(_NODE_OPS)})")
    schema.check_type(target, str, f"node {name}: target")
    schema.check_type(entry.get("args", []), list, f"node {name}: args")
    kwargs = schema.check_type(entry.get("kwargs", {}), dict, f"node {name}: kwargs")
    schema.check_type(entry.get("meta", {}), dict, f"node {name}: meta")
    for key in kwargs:  # keyword names are written into the generated call as they are
        schema.check_name(key, f"node {name}: keyword argument")
    schema.check_depth(entry, f"node {name}")
    if op == "placeholder":
        schema.check_name(target, f"node {name}: placeholder target")
    if op == "get_attr" and target not in table:
        raise Invalid(f"node {name}: get_attr of {target!r}, which is not a stored tensor")
    if op == "get_attr":
        schema.check_code_path(target, f"node {name}: get_attr target")
    if op == "call_module" and target not in modules:
        raise Invalid(f"node {name}: calls module {target[:80]!r}, which is not a trainable module of the file "
                      f"(its 'trainable' document declares {len(modules)})")


def decode(v, env: dict[str, fx.Node]):
    """JSON -> Python value; ``$node`` references resolve in ``env`` (nodes defined before this one).
    Nesting was bounded by ``schema.check_depth`` before this recursion."""
    if isinstance(v, list):
        return [decode(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise Invalid(f"value {v!r} is not a tagged value")
    (tag, payload), = v.items()
    if tag == "$node":
        if not isinstance(payload, str) or payload not in env:
            raise Invalid(f"reference to node {payload!r}, which is not defined before its use")
        return env[payload]
    if tag in ("$tuple", "$slice", "$dict") and not isinstance(payload, list):
        raise Invalid(f"{tag} needs a list, got {type(payload).__name__}")
    if tag == "$tuple":
        return tuple(decode(x, env) for x in payload)
    if tag == "$dict":
        if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) for kv in payload):
            raise Invalid("$dict needs [key, value] pairs with string or int keys")
        return {k: decode(x, env) for k, x in payload}
    if tag == "$slice":
        if len(payload) != 3:
            raise Invalid("$slice needs [start, stop, step]")
        return slice(*(decode(x, env) for x in payload))
    if tag == "$float":
        if payload not in _FLOATS:
            raise Invalid(f"$float payload {payload!r} is not one of {sorted(_FLOATS)}")
        return _FLOATS[payload]
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$device":
        return torch.device(schema.check_device(payload))
    if tag in _ENUMS:
        value = getattr(torch, payload, None) if isinstance(payload, str) and payload.isidentifier() else None
        if not isinstance(value, _ENUMS[tag]):
            raise Invalid(f"{payload!r} is not a torch {tag[1:]}")
        return value
    raise Invalid(f"unknown value tag {tag!r}")


def _decode_codegen(doc, path: str) -> fx.graph.CodeGen:
    if not isinstance(doc, dict) or doc.get("kind") not in ("flat", "pytree"):
        raise Invalid(f"codegen {doc!r} is neither flat nor pytree")
    if doc["kind"] == "flat":
        return fx.graph.CodeGen()
    orig_args = schema.check_type(doc.get("orig_args", []), list, "codegen orig_args")
    for a in orig_args:
        schema.check_name(a, "a forward argument")
    if len(set(orig_args)) != len(orig_args):
        raise Invalid(f"codegen orig_args {orig_args!r} name an argument twice")
    specs = [schema.check_type(doc.get(k), str, f"codegen {k}") for k in ("in_spec", "out_spec")]
    try:
        specs = [trees.decode_spec(text, what, path) for text, what in zip(specs, ("inputs", "outputs"))]
    except Invalid:
        raise
    except Exception as e:  # noqa: BLE001 - pytree raises several types (and RecursionError on deep JSON)
        raise ArtifactError(
            f"{path}: the model's input/output structure cannot be rebuilt ({type(e).__name__}: {e}). If it uses "
            f"a custom container, register it with torch.utils.pytree (serialized_type_name=...) before nesc.load."
        ) from e
    return compat.make_pytree_codegen(orig_args, *specs)
