"""Save and load nesc models: one safetensors file holding tensors and a JSON graph; never pickle.

Why not ``torch.save``: a pickle runs code when it is loaded and ties the file to the classes that
wrote it. A nesc artifact is plain data, so a file from anyone can be opened safely: tensors in the
safetensors body, everything else as JSON strings in its header; every name that ends up in
generated Python code (node names, attribute paths, argument names) is checked to be an identifier,
and call targets resolve only to torch ops and a fixed list of arithmetic functions.

A graph captured by ``symbolic_trace`` calls modules (``nn.BatchNorm2d``, ...) whose constructor
arguments cannot be recovered generically, so ``save`` first re-exports the model with
``torch.export`` in eval mode, which leaves one aten-level graph of ``call_function`` nodes on
``get_attr`` tensors, and writes that graph. ``load`` rebuilds it and turns batch norm / dropout back
into modules that follow ``train()``/``eval()`` (``nesc.capture.make_mode_aware``).

Format, ``FORMAT_VERSION`` 1. Tensors: every parameter and buffer of the saved module under its
``state_dict`` name, plus tensor constants of the exported graph; a name that aliases another tensor
(tied weights) is stored once. Tensors are stored contiguous; a transposed or channels_last one
records its strides and gets them back. Header metadata (all strings):

    format          "nesc"
    format_version  "1"
    nesc_version    the nesc that wrote the file;  torch_version: the torch that wrote it
    graph           JSON {"nodes": [...], "codegen": {...}} (see ``_encode_graph``)
    tensors         JSON {name: {"kind": "parameter"|"buffer"|"constant", "requires_grad",
                    "persistent", "stride", "alias_of"}} (see ``_collect_tensors``)
    input_specs     JSON [[shape, dtype], ...] of the example inputs
    extra           JSON of the caller's ``extra`` dict (e.g. the compression report)
    sha256          hex digest over the stored tensors: name, dtype, shape and bytes, by name

Decisions:

* Call signature: the exported graph's pytree codegen is kept (input and output ``TreeSpec`` via
  ``treespec_dumps``), so the loaded module takes the same arguments and returns the same nested
  outputs (a dict stays a dict) as the saved one.
* ``_guards_fn`` is dropped: it is a Python callable ``torch.export`` attaches to check input
  shapes against the export-time constraints; it is code, not data, and cannot be written without
  pickle. Nothing is lost numerically: the graph keeps the batch symbolic (``aten.sym_size`` nodes)
  where the exporter did, so the loaded module runs at any batch size; a wrong input shape fails in
  the first op that cannot take it instead of up front.
* The batch stays symbolic even for a batch-1 example: the export uses batch 2 in that case,
  because torch.export specialises dimensions of size 1 to constants.
* ``save`` checks the artifact before writing it: it rebuilds the module from what it is about to
  write and requires outputs equal (``torch.equal``) to the saved module's eval outputs. Layout
  (strides) and alignment (tensors are cloned into torch's 64-byte-aligned memory on load) matter
  for that: CPU kernels may sum in another order otherwise.
* Load order of checks: file exists; safetensors header readable; ``format``; ``format_version``;
  ``sha256``; graph JSON well-formed; every call target resolves. Each failure is an
  ``ArtifactError`` naming the file, the problem and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import keyword
import math
import operator
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES  # {"F32": torch.float32, ...}
from safetensors.torch import save_file
from torch import Tensor, fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate, which graphs reference
from nesc.core import names
from nesc.capture import ExportedBatchNorm, make_mode_aware
from nesc.core.inputs import batch_dims as _batch_dims
from nesc.core.errors import ArtifactError

FORMAT = "nesc"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
# gm.meta key under which load() returns the caller's ``extra`` dict.
EXTRA = "nesc_extra"
# node.meta key: this batch norm used a cumulative average (momentum=None) — eval-mode export
# flattens that to momentum 0.0, which would freeze the statistics once the loaded model trains.
_BN_CUMULATIVE = "nesc_bn_cumulative"
_KEPT_META = (names.SAMPLED_WEIGHT, "nn_module_stack", _BN_CUMULATIVE)
_GUARDS = "_guards_fn"
_REGENERATE = torch.ops.nesc.regenerate.default
# The Python callables an exported graph may call (symbolic-shape arithmetic, getitem on multi-output
# ops), by name. An explicit list, not "anything in operator": operator.attrgetter / methodcaller /
# call would let a crafted file reach arbitrary Python.
_PY_FUNCTIONS = {
    f"operator.{n}": getattr(operator, n)
    for n in "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor "
    "not_ invert lshift rshift".split()
}
_PY_FUNCTIONS |= {f"math.{n}": getattr(math, n) for n in dir(math) if callable(getattr(math, n)) and n[0] != "_"}
_PY_FUNCTIONS |= {f"torch.{n}": getattr(torch, n) for n in dir(torch) if n.startswith(("sym_", "_sym_"))}
_PY_NAMES = {id(fn): name for name, fn in _PY_FUNCTIONS.items()}
_STORABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())
_ENUMS = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}


# --------------------------------------------------------------------------------------- save


def save(gm: fx.GraphModule, path: str | os.PathLike, *, extra: dict | None = None) -> None:
    """Write ``gm`` (typically a frozen nesc model) to ``path`` as one safetensors file.

    Needs ``gm.meta[nesc.meta.INPUT_SPECS]`` (written by capture) to re-export the graph. ``extra``
    is any JSON-serialisable dict (tuples come back as lists); ``load`` returns it as
    ``gm.meta["nesc_extra"]``. Raises ``ArtifactError`` when the model cannot be written exactly.
    """
    specs = _input_specs(gm)
    extra_json = _json_or_raise(extra or {}, "extra")
    graph_doc, tensors, table = _export_graph(gm, specs, *_collect_tensors(gm))
    stored = {n: t for n, t in tensors.items() if "alias_of" not in table[n]}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "nesc_version": _nesc_version(),
        "torch_version": torch.__version__,
        "graph": json.dumps(graph_doc, allow_nan=False),
        "tensors": json.dumps(table, allow_nan=False),
        "input_specs": json.dumps([[list(s), d] for s, d in specs]),
        "extra": extra_json,
        "sha256": _digest(stored),
    }
    path = os.fspath(path)
    partial = f"{path}.partial"
    save_file(stored, partial, metadata=metadata)
    os.replace(partial, path)  # a crash mid-write never leaves a truncated artifact under ``path``


def _input_specs(gm: fx.GraphModule) -> list[tuple[tuple[int, ...], str]]:
    specs = getattr(gm, "meta", {}).get(names.INPUT_SPECS)
    if not specs:
        raise ArtifactError(
            f"cannot save: gm.meta[{names.INPUT_SPECS!r}] is missing, and save needs the example inputs' "
            f"shapes to re-export the graph. Capture the model with nesc (nesc.capture / nesc.transform), "
            f"or set gm.meta[{names.INPUT_SPECS!r}] = [((1, 3, 32, 32), 'float32')] (one entry per input)."
        )
    out = []
    for shape, dtype in specs:
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ArtifactError(
                f"cannot save: input spec dtype {dtype!r} is not a torch dtype name (e.g. 'float32')"
            )
        out.append((tuple(int(d) for d in shape), str(dtype)))
    return out


def _json_or_raise(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"cannot save: {what} is not JSON-serialisable ({e}). Pass plain dicts, lists, strings and "
            f"numbers (e.g. dataclasses.asdict(report))."
        ) from e


def _nesc_version() -> str:
    try:
        return importlib.metadata.version("nesc")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------- tensors


def _collect_tensors(gm: fx.GraphModule) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Every parameter and buffer as a contiguous CPU tensor, and the table that says how to restore it.

    An exact alias (same storage, offset, shape, stride, dtype: tied weights) becomes ``alias_of`` its
    first name and is stored once; any other tensor sharing storage is copied, since safetensors
    stores each tensor in its own bytes.
    """
    tensors: dict[str, Tensor] = {}
    table: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    non_persistent = {
        f"{prefix}.{b}" if prefix else b
        for prefix, mod in gm.named_modules()
        for b in mod._non_persistent_buffers_set
    }
    entries = [(n, t, "parameter") for n, t in gm.named_parameters(remove_duplicate=False)]
    entries += [(n, t, "buffer") for n, t in gm.named_buffers(remove_duplicate=False)]
    for name, t, kind in entries:
        entry: dict[str, Any] = {"kind": kind}
        if kind == "parameter":
            entry["requires_grad"] = bool(t.requires_grad)
        elif name in non_persistent:
            entry["persistent"] = False
        if t.numel() > 0 and not t.is_contiguous() and _is_dense(t.shape, t.stride()):
            # A transposed or channels_last tensor is stored contiguous and gets its strides back on
            # load: kernels may sum in another order on another layout, and outputs must stay exact.
            entry["stride"] = list(t.stride())
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() > 0 and key in seen:
            entry["alias_of"] = seen[key]
        else:
            seen[key] = name
            tensors[name] = _storable(t, shared=t.untyped_storage().data_ptr() in storages)
            storages.add(t.untyped_storage().data_ptr())
        table[name] = entry
    unsupported = sorted({f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in _STORABLE_DTYPES})
    if unsupported:
        raise ArtifactError(
            f"cannot save: safetensors cannot store these tensors' dtypes: {', '.join(unsupported)}. Convert "
            f"them (e.g. dequantize) before saving."
        )
    for name, entry in table.items():
        if "alias_of" in entry:
            tensors[name] = tensors[entry["alias_of"]]
    return tensors, table


def _is_dense(shape, stride) -> bool:
    """(shape, stride) is a permutation of a contiguous layout: no gaps, no overlap (size-1 dims free)."""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda p: p[1]):
        if size != 1:
            if step != expected:
                return False
            expected *= size
    return True


def _storable(t: Tensor, *, shared: bool) -> Tensor:
    t = t.detach().cpu()
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if shared or not whole or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)  # a view of a larger or shared storage
    return t


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()  # raw little-endian bytes, any dtype
        h.update(json.dumps([name, str(t.dtype), list(t.shape), data.nbytes]).encode())
        h.update(data)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ export


def _export_graph(gm: fx.GraphModule, specs, tensors: dict[str, Tensor], table: dict[str, dict]):
    """Re-export ``gm`` in eval mode and encode the aten graph; check it rebuilds to the same outputs.

    Returns (graph JSON, tensors, table) where tensor constants the exporter lifted (a
    ``torch.tensor(...)`` in forward) are added as kind "constant".
    """
    reference = _example_inputs(specs)
    attempts = [_example_inputs(specs, batch_one_as=2), reference] if _has_batch_one(specs) else [reference]
    was_training = gm.training
    gm.eval()
    failures = []
    try:
        with torch.no_grad():
            expected = _run_own_example(gm, reference)
        for inputs in attempts:
            try:
                ep = torch.export.export(gm, inputs, dynamic_shapes=_batch_dims(inputs))
            except Exception as e:  # noqa: BLE001 - reported below with every attempt
                failures.append(f"torch.export.export on shapes {_shapes(inputs)}: {type(e).__name__}: {e}")
                continue
            exported = ep.module()
            _carry_meta(gm, exported)
            all_tensors, all_table = _with_constants(exported, tensors, table)
            doc = _encode_graph(exported.graph, all_table)
            mismatch = _check_rebuild(doc, all_tensors, all_table, reference, expected)
            if mismatch is None:
                return doc, all_tensors, all_table
            failures.append(f"graph exported on shapes {_shapes(inputs)}: {mismatch}")
    finally:
        gm.train(was_training)
    raise ArtifactError(
        "cannot save: re-exporting the model with torch.export (eval mode) did not reproduce it:\n  "
        + "\n  ".join(failures)
        + "\nsave writes the aten graph torch.export produces, so the model's eval-mode forward must be "
        "exportable and deterministic."
    )


def _run_own_example(gm: fx.GraphModule, inputs):
    try:
        return gm(*inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with what save was doing
        raise ArtifactError(
            f"cannot save: the model fails on inputs built from gm.meta[{names.INPUT_SPECS!r}] "
            f"(shapes {_shapes(inputs)}): {type(e).__name__}: {e}. Set the specs to the shapes and dtypes "
            f"its forward takes."
        ) from e


def _has_batch_one(specs) -> bool:
    return any(len(shape) > 0 and shape[0] == 1 for shape, _ in specs)


def _example_inputs(specs, *, batch_one_as: int | None = None) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)  # fixed and private: save must not move the global RNG
    inputs = []
    for shape, dtype in specs:
        shape = list(shape)
        if batch_one_as is not None and shape and shape[0] == 1:
            shape[0] = batch_one_as
        dt = getattr(torch, dtype)
        if dt.is_floating_point or dt.is_complex:
            inputs.append(torch.randn(shape, generator=gen, dtype=dt))
        else:
            inputs.append(torch.zeros(shape, dtype=dt))  # indices: 0 is valid for any embedding
    return tuple(inputs)


def _summary(x) -> str:
    return f"a {str(x.dtype).removeprefix('torch.')} tensor {tuple(x.shape)}" if isinstance(x, Tensor) else repr(x)


def _shapes(inputs) -> str:
    return ", ".join(str(tuple(t.shape)) for t in inputs)


def _carry_meta(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Copy what export does not keep from ``src``'s nodes onto ``dst``'s.

    Regenerate nodes are matched by the pool / routing tensors they read (by order when that is
    ambiguous); batch norms by their running mean.
    """
    src_regen = [n for n in src.graph.nodes if n.target is _REGENERATE]
    dst_regen = [n for n in dst.graph.nodes if n.target is _REGENERATE]
    by_key: dict[tuple, list[fx.Node]] = {}
    for n in src_regen:
        by_key.setdefault(_route_key(n), []).append(n)
    for i, n in enumerate(dst_regen):
        same = by_key.get(_route_key(n), [])
        origin = same[0] if len(same) == 1 else src_regen[i] if len(src_regen) == len(dst_regen) else None
        if origin is not None and names.SAMPLED_WEIGHT in origin.meta:
            n.meta[names.SAMPLED_WEIGHT] = origin.meta[names.SAMPLED_WEIGHT]
    wanted = sorted(n.meta[names.SAMPLED_WEIGHT] for n in src_regen if names.SAMPLED_WEIGHT in n.meta)
    got = sorted(n.meta[names.SAMPLED_WEIGHT] for n in dst_regen if names.SAMPLED_WEIGHT in n.meta)
    if wanted != got:
        raise ArtifactError(
            f"cannot save: the re-exported graph's nesc.regenerate nodes could not be matched to the model's "
            f"(sampled weights {wanted}, matched {got}). Each regenerate node should read its pool and "
            f"routing map through get_attr nodes, as passes.freeze writes them."
        )
    cumulative = _cumulative_batch_norms(src)
    for n in dst.graph.nodes:
        if n.target is torch.ops.aten.batch_norm.default and _attr_target(n.args[3]) in cumulative:
            n.meta[_BN_CUMULATIVE] = True


def _route_key(node: fx.Node) -> tuple:
    return tuple(_attr_target(a) for a in node.args[:3])


def _attr_target(arg) -> str | None:
    return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _cumulative_batch_norms(gm: fx.GraphModule) -> set[str]:
    """Running-mean names of batch norms with ``momentum=None`` (cumulative average)."""
    names = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.momentum is None:
            names.add(f"{node.target}.running_mean")
        elif isinstance(mod, ExportedBatchNorm) and mod.momentum is None and len(node.args) > 3:
            names.add(_attr_target(node.args[3]))
    names.discard(None)
    return names


def _with_constants(exported: fx.GraphModule, tensors: dict[str, Tensor], table: dict[str, dict]):
    tensors, table = dict(tensors), dict(table)
    for node in exported.graph.nodes:
        if node.op != "get_attr" or node.target in table:
            continue
        value = _get_path(exported, node.target)
        if isinstance(value, Tensor):
            tensors[node.target] = _storable(value, shared=True)
            table[node.target] = {"kind": "constant"}
    return tensors, table


def _get_path(root: nn.Module, path: str):
    obj = root
    for atom in path.split("."):
        obj = getattr(obj, atom, None)
    return obj


def _check_rebuild(doc, tensors, table, inputs, expected) -> str | None:
    """Rebuild the module from exactly what save will write; None when its outputs equal ``expected``."""
    try:
        loaded = _assemble(doc, {n: t for n, t in tensors.items() if "alias_of" not in table[n]}, table, "<save>")
        with torch.no_grad():
            got = loaded(*inputs)
    except ArtifactError as e:  # a bug of nesc or an unsupported model, not a damaged file
        raise ArtifactError(f"cannot save: the artifact would not load back: {e}") from e
    except Exception as e:  # noqa: BLE001 - a graph that does not run on the example is a failed attempt
        return f"the rebuilt graph fails on the example inputs: {type(e).__name__}: {e}"
    want_leaves, got_leaves = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    if len(want_leaves) != len(got_leaves):
        return f"{len(got_leaves)} outputs instead of {len(want_leaves)}"
    for i, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        if isinstance(w, Tensor):
            if not (isinstance(g, Tensor) and g.dtype == w.dtype and g.shape == w.shape):
                return f"output {i} is {_summary(g)}, the model gives {_summary(w)}"
            if not torch.equal(g, w):
                diff = (g.double() - w.double()).abs().max().item()
                return f"output {i} differs from the model's by up to {diff:.3g} (must be bit-exact)"
        elif w != g:
            return f"output {i} is {g!r}, the model gives {w!r}"
    return None


# ---------------------------------------------------------------------------- graph <-> JSON


class _Unencodable(Exception):
    pass


def _encode_graph(graph: fx.Graph, tensor_names) -> dict:
    """{"nodes": [{op, name, target, args, kwargs, meta}, ...], "codegen": ...}; lists all failures at once."""
    nodes, problems = [], []
    for node in graph.nodes:
        if node.op == "call_module" and node.target == _GUARDS and not node.users:
            continue  # export's input-shape check: Python code, see the module docstring
        try:
            if node.op == "get_attr":
                _check_encodable_attr(node, tensor_names)
            nodes.append(_encode_node(node))
        except _Unencodable as e:
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
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    return target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))


def _encode_node(node: fx.Node) -> dict:
    if node.op in ("placeholder", "get_attr", "output"):
        target = node.target
    elif node.op == "call_function":
        target = _encode_target(node.target)
    else:
        raise _Unencodable(f"{node.op} nodes are not supported; only aten-level call_function graphs are")
    entry: dict[str, Any] = {"op": node.op, "name": node.name, "target": target}
    if node.args:
        entry["args"] = _encode(list(node.args))
    if node.kwargs:
        entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
    kept = {k: _encode(_plain_meta(k, node.meta[k])) for k in _KEPT_META if k in node.meta}
    if kept:
        entry["meta"] = kept
    return entry


def _encode_target(fn) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return f"{fn.namespace}::{fn._opname}.{fn._overloadname}"  # e.g. aten::conv2d.default
    if id(fn) in _PY_NAMES:
        return _PY_NAMES[id(fn)]
    raise _Unencodable(f"target {_describe(fn)} is not a torch op overload or an operator/math function")


def _check_encodable_attr(node: fx.Node, tensor_names) -> None:
    if node.target not in tensor_names:
        raise _Unencodable(f"get_attr of {node.target!r}, which is not a tensor (a higher-order op's subgraph?)")


def _plain_meta(key: str, value):
    if key == "nn_module_stack":  # {key: (path, type)}; some torch versions keep the type object itself
        return {str(k): tuple(x if isinstance(x, str) else _type_name(x) for x in v) for k, v in value.items()}
    return value


def _type_name(x) -> str:
    return f"{x.__module__}.{x.__qualname__}" if isinstance(x, type) else str(x)


def _encode(v):
    """Python value -> JSON. JSON-native scalars stay; the rest become {"$tag": payload}."""
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$float": repr(v)}  # 'inf', '-inf', 'nan'
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, tuple):
        return {"$tuple": [_encode(x) for x in v]}
    if isinstance(v, dict):
        return {"$dict": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"$slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    for tag, kind in _ENUMS.items():
        if isinstance(v, kind):
            return {tag: str(v).removeprefix("torch.")}
    raise _Unencodable(f"argument {v!r} of type {type(v).__name__} has no JSON form")


def _encode_codegen(graph: fx.Graph) -> dict:
    codegen = graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return {"kind": "flat"}
    info = codegen.pytree_info
    try:
        specs = {k: pytree.treespec_dumps(s) if s is not None else None for k, s in
                 (("in_spec", info.in_spec), ("out_spec", info.out_spec))}
    except Exception as e:  # noqa: BLE001 - pytree raises several types for unregistered nodes
        raise ArtifactError(
            f"cannot save: the model's inputs/outputs use a container pytree cannot serialise ({e}). "
            f"Return tensors, tuples, lists or dicts, or register the type with "
            f"torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)."
        ) from e
    return {"kind": "pytree", "orig_args": list(info.orig_args), **specs}


def _decode(v, env: dict[str, fx.Node]):
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise _Invalid(f"value {v!r} is not a tagged value")
    (tag, payload), = v.items()
    if tag == "$node":
        if payload not in env:
            raise _Invalid(f"reference to node {payload!r}, which is not defined before its use")
        return env[payload]
    if tag == "$tuple":
        return tuple(_decode(x, env) for x in payload)
    if tag == "$dict":
        return {_decode(k, env): _decode(x, env) for k, x in payload}
    if tag == "$float":
        return float(payload)
    if tag == "$slice":
        return slice(*(_decode(x, env) for x in payload))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$device":
        return torch.device(payload)
    if tag in _ENUMS:
        value = getattr(torch, str(payload), None)
        if not isinstance(value, _ENUMS[tag]):
            raise _Invalid(f"{payload!r} is not a torch {tag[1:]}")
        return value
    raise _Invalid(f"unknown value tag {tag!r}")


class _Invalid(Exception):
    pass


# --------------------------------------------------------------------------------------- load


@dataclass
class _Header:
    metadata: dict[str, str]
    tensors: dict[str, Tensor]


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a model written by ``save``; returns an ``fx.GraphModule`` in eval mode.

    Tensors come back on the CPU with their dtypes, parameters as ``nn.Parameter`` (tied ones tied),
    buffers as buffers; ``train()``/``eval()`` switch batch norm and dropout. ``gm.meta`` holds the
    input specs and, under ``"nesc_extra"``, the ``extra`` dict given to ``save``. Every failure is an
    ``ArtifactError`` naming the file, what is wrong and what to do.
    """
    path = os.fspath(path)
    header = _read(path)
    md = header.metadata
    _check_format(md, path)
    _check_digest(md, header.tensors, path)
    doc, table, specs, extra = _parse_json(md, path)
    gm = _assemble(doc, header.tensors, table, path)
    gm.meta[names.INPUT_SPECS] = specs
    gm.meta[names.CAPTURE] = "export"  # an aten graph with mode-aware modules, as capture's export path
    gm.meta[EXTRA] = extra
    return gm


def _read(path: str) -> _Header:
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "no such file"
        raise ArtifactError(f"{path}: {what}. Check the path; nesc.save(model, path) writes the artifact.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            # clone: torch's allocator aligns to 64 bytes, safetensors' buffers do not, and CPU kernels
            # (gemv, vectorised reductions) may sum in another order on unaligned data — not bit-exact.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({e}). The file is truncated, corrupted, or not a "
            f"nesc artifact; copy it again or re-save the model with nesc.save."
        ) from e
    return _Header(metadata, tensors)


def _check_format(md: dict[str, str], path: str) -> None:
    if md.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: a safetensors file but not a nesc artifact (metadata 'format' is {md.get('format')!r}, "
            f"expected {FORMAT!r}). Plain weight files load with safetensors.torch.load_file; nesc.load "
            f"reads files written by nesc.save."
        )
    raw = md.get("format_version")
    try:
        version = int(raw)
    except (TypeError, ValueError):
        version = None
    if version not in READABLE_VERSIONS:
        written_by = md.get("nesc_version", "an unknown nesc")
        raise ArtifactError(
            f"{path}: format_version {raw!r} (written by nesc {written_by}); this nesc ({_nesc_version()}) "
            f"reads format_version {', '.join(map(str, READABLE_VERSIONS))}. Load it with nesc {written_by} "
            f"and re-save it with the nesc that matches this one (or upgrade nesc)."
        )


def _check_digest(md: dict[str, str], tensors: dict[str, Tensor], path: str) -> None:
    want = md.get("sha256")
    got = _digest(tensors)
    if want != got:
        raise ArtifactError(
            f"{path}: tensor data does not match its sha256 (header says {want}, data hashes to {got}): the "
            f"file was corrupted or tampered with after nesc.save wrote it. Use an intact copy or re-save."
        )


def _parse_json(md: dict[str, str], path: str):
    try:
        doc = json.loads(md["graph"])
        table = json.loads(md["tensors"])
        specs = [(tuple(int(d) for d in shape), str(dtype)) for shape, dtype in json.loads(md["input_specs"])]
        extra = json.loads(md.get("extra", "{}"))
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not isinstance(table, dict):
            raise ValueError("'graph' must be an object with a 'nodes' list and 'tensors' an object")
    except (KeyError, ValueError, TypeError) as e:
        raise _invalid(path, f"header JSON: {type(e).__name__}: {e}") from e
    return doc, table, specs, extra


def _invalid(path: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: invalid graph description ({what}). The header was edited or written by a broken nesc; "
        f"re-save the model with nesc.save."
    )


# ------------------------------------------------------------------------------- rebuilding


def _assemble(doc: dict, stored: dict[str, Tensor], table: dict, path: str) -> fx.GraphModule:
    """Module holding the tensors at their dotted paths + the decoded graph, mode-aware, in eval mode."""
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    try:
        _install_tensors(gm, stored, table)
        graph = _decode_graph(doc, table, path)
    except _Invalid as e:
        raise _invalid(path, str(e)) from e
    gm.graph = graph  # recompiles
    try:
        make_mode_aware(gm)  # aten batch_norm/dropout -> modules that follow gm.training; lints
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a batch_norm node with the wrong arity
        raise _invalid(path, f"batch norm / dropout nodes cannot be made mode-aware: {e}") from e
    for node in gm.graph.nodes:
        if node.meta.get(_BN_CUMULATIVE) and node.op == "call_module":
            gm.get_submodule(node.target).momentum = None
    return gm.eval()


def _install_tensors(gm: nn.Module, stored: dict[str, Tensor], table: dict) -> None:
    missing = sorted(n for n, e in table.items() if "alias_of" not in e and n not in stored)
    unlisted = sorted(set(stored) - set(table))
    if missing or unlisted:
        raise _Invalid(f"tensor table and file disagree: listed but absent {missing}, unlisted {unlisted}")
    made: dict[str, Tensor] = {}
    for name in sorted(table, key=lambda n: "alias_of" in table[n]):  # originals before their aliases
        entry = table[name]
        _check_path(name)
        kind = entry.get("kind")
        source = entry.get("alias_of", name)
        if source not in made and source not in stored:
            raise _Invalid(f"tensor {name!r} aliases {source!r}, which is not stored")
        *prefix, leaf = name.split(".")
        parent = gm
        for atom in prefix:
            if not hasattr(parent, atom):
                parent.add_module(atom, nn.Module())
            parent = getattr(parent, atom)
            if not isinstance(parent, nn.Module):
                raise _Invalid(f"tensor path {name!r} runs through a non-module {atom!r}")
        if hasattr(parent, leaf):
            raise _Invalid(f"tensor {name!r} is listed twice or clashes with a module attribute")
        value = made[source] if source in made else _with_layout(stored[source], entry.get("stride"), name)
        if kind == "parameter":
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=bool(entry.get("requires_grad", True)))
            parent.register_parameter(leaf, value)
        elif kind == "buffer":
            parent.register_buffer(leaf, value.detach(), persistent=entry.get("persistent", True))
        elif kind == "constant":
            setattr(parent, leaf, value)
        else:
            raise _Invalid(f"tensor {name!r} has unknown kind {kind!r}")
        made[name] = value


def _with_layout(t: Tensor, stride, name: str) -> Tensor:
    if stride is None:
        return t
    if not (isinstance(stride, list) and len(stride) == t.dim() and all(type(d) is int and d >= 0 for d in stride)
            and _is_dense(t.shape, stride)):
        raise _Invalid(f"tensor {name!r}: stride {stride!r} is not a dense layout of shape {tuple(t.shape)}")
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype)
    out.copy_(t)
    return out


def _check_path(path) -> None:
    # Paths and names are pasted into generated Python code: only identifiers (and the digits of
    # nn.Sequential children, which fx writes as getattr(m, "0")) may pass.
    atoms = path.split(".") if isinstance(path, str) else [None]
    if not all(isinstance(a, str) and (_identifier(a) or (a.isascii() and a.isdigit())) for a in atoms):
        raise _Invalid(f"{path!r} is not a dotted path of Python identifiers")


def _identifier(a: str) -> bool:
    return a.isidentifier() and not keyword.iskeyword(a)


def _check_name(name) -> None:
    if not (isinstance(name, str) and _identifier(name)):
        raise _Invalid(f"{name!r} is not a Python identifier")


def _decode_graph(doc: dict, table: dict, path: str) -> fx.Graph:
    nodes = doc["nodes"]
    for i, entry in enumerate(nodes):
        _check_node(i, entry, table)
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
            "nesc.sampling), or load with the torch version that wrote the file."
        )
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in nodes:
        op, name = entry["op"], entry["name"]
        try:
            args = tuple(_decode(entry.get("args", []), env))
            kwargs = {k: _decode(v, env) for k, v in entry.get("kwargs", {}).items()}
            node_meta = {k: _decode(v, env) for k, v in entry.get("meta", {}).items() if k in _KEPT_META}
        except (TypeError, ValueError, RuntimeError) as e:  # a malformed payload under a valid tag
            raise _Invalid(f"node {name}: malformed value ({type(e).__name__}: {e})") from e
        node = graph.create_node(op, targets.get(name, entry["target"]), args, kwargs, name=name)
        if node.name != name:
            raise _Invalid(f"node name {name!r} is used twice")
        node.meta.update(node_meta)
        env[name] = node
    graph._codegen = _decode_codegen(doc.get("codegen", {"kind": "flat"}), path)
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises RuntimeError with the reason
        raise _Invalid(f"graph fails lint: {e}") from e
    return graph


def _check_node(i: int, entry, table: dict) -> None:
    if not isinstance(entry, dict) or not {"op", "name", "target"} <= entry.keys():
        raise _Invalid(f"node #{i} must be an object with op, name and target")
    op, name, target = entry["op"], entry["name"], entry["target"]
    _check_name(name)  # node names become variables of the generated forward
    if not isinstance(target, str) or not isinstance(entry.get("args", []), list):
        raise _Invalid(f"node {name}: target must be a string and args a list")
    if not isinstance(entry.get("kwargs", {}), dict) or not isinstance(entry.get("meta", {}), dict):
        raise _Invalid(f"node {name}: kwargs and meta must be objects")
    if op not in ("placeholder", "get_attr", "call_function", "output"):
        raise _Invalid(f"node {name}: op {op!r} is not one nesc writes")
    if op == "placeholder":
        _check_name(target)
    if op == "get_attr" and target not in table:
        raise _Invalid(f"node {name}: get_attr of {target!r}, which is not a stored tensor")


def _resolve_target(text: str):
    if "::" in text:
        namespace, _, rest = text.partition("::")
        opname, _, overload = rest.rpartition(".")
        try:
            fn = getattr(getattr(getattr(torch.ops, namespace), opname), overload)
        except (AttributeError, RuntimeError) as e:
            raise LookupError(f"unknown operator {text!r}") from e
        if not isinstance(fn, torch._ops.OpOverload):
            raise LookupError(f"{text!r} is not an operator overload")
        return fn
    if text in _PY_FUNCTIONS:
        return _PY_FUNCTIONS[text]
    raise LookupError(
        f"unknown function {text!r} (nesc reads torch ops and the arithmetic of operator, math, torch.sym_*)"
    )


def _decode_codegen(doc, path: str):
    if not isinstance(doc, dict) or doc.get("kind") not in ("flat", "pytree"):
        raise _Invalid(f"codegen {doc!r} is neither flat nor pytree")
    if doc["kind"] == "flat":
        return fx.graph.CodeGen()
    orig_args = doc.get("orig_args", [])
    for a in orig_args:
        _check_name(a)
    try:
        specs = [pytree.treespec_loads(doc[k]) if doc.get(k) else None for k in ("in_spec", "out_spec")]
    except Exception as e:  # noqa: BLE001 - pytree raises several types
        raise ArtifactError(
            f"{path}: the model's input/output structure cannot be rebuilt ({e}). If it uses a custom "
            f"container, import the module that registers it with torch.utils._pytree before nesc.load."
        ) from e
    return _PyTreeCodeGen(_PyTreeInfo(orig_args, *specs))


__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION", "EXTRA"]
