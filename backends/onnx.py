"""ONNX export that stays compressed: pools and routing maps are the file's tensors, weights are ops.

A frozen nesc model computes each weight with ``torch.ops.nesc.regenerate``. Exported naively, every
tool on the way folds that computation into a dense constant, because all of its inputs are
initializers: the legacy exporter (unless ``do_constant_folding=False``), the dynamo exporter's
optimizer (``optimize=True`` folds the small layers), onnxsim (unless told that initializers are not
constants). So the route is, one named step per line of ``export_onnx``:

1. ``lower``: run the rewrite pass each nesc op names in ``LOWERINGS`` on a copy of the model
   (``decompose_regenerate``: index arithmetic over the pool and the routing map);
2. ``capture``: ``torch.export`` with a symbolic batch dimension;
3. ``check_supported``: list *every* op that the exporter's registry (torchlib) can neither translate
   nor decompose in one ``OnnxExportError``, before any translation starts;
4. ``translate``: ``torch.onnx.export(dynamo=True, optimize=False)``; the TorchScript exporter
   (``dynamo=False``) cannot translate the aten ops the lowering produces (``aten::_to_copy``);
5. ``simplify``: onnxsim with ``initializers_as_constants=False``: it folds shape arithmetic and
   ``Range``s but leaves every node that depends on an initializer, so no weight is baked in;
6. ``check_compressed``: the bytes of every tensor stored in the file (initializers and
   ``Constant`` nodes) must stay at what the frozen module stores, and fail loudly when a folded
   weight brought the dense size back;
7. ``save``: one self-contained file (no ``.onnx.data`` next to it).

Opset 18 (``DEFAULT_OPSET``): the opset torchlib's translations are written for; onnxruntime 1.31 and
TVM's Relax ONNX frontend import it.
"""

from __future__ import annotations

import copy
import functools
import operator
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, fx, nn

from nesc.core.errors import InputError, NescError
from nesc.passes.pipeline import PASSES
from nesc.report import stored_bytes

try:
    import onnx
    import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates through it)
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise NescError(
        f"nesc's ONNX export needs onnx, onnxscript and onnxsim: pip install 'nesc[onnx]'; import failed with: {e}"
    ) from e

DEFAULT_OPSET = 18
BATCH = "batch"  # name of the symbolic batch dimension in the exported file
PROTOBUF_LIMIT = 2**31  # a single-file ONNX model must serialise under 2 GiB

# nesc's own ops -> the rewrite pass (a name in nesc.passes.pipeline.PASSES) that turns them into ops
# the exporter knows. Run on a copy of the model before capture.
LOWERINGS: dict[object, str] = {
    torch.ops.nesc.regenerate.default: "decompose_regenerate",
}

# Graph plumbing that torch.onnx translates itself, outside its op registry (tuple outputs, symbolic
# sizes and the arithmetic on them, runtime assertions it removes).
PLUMBING: frozenset = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min,
    torch.ops.aten.sym_size.int, torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_tensor_metadata.default,
})

# Ops with this kernel are rewritten into other aten ops by every decomposition (aten.batch_norm, ...).
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd

# Extra bytes a simplified file may store beyond the frozen module's own tensors: the aranges of the
# window indices and shape vectors, which onnxsim folds into small initializers. A folded weight is
# orders of magnitude more (its whole block grid), which is what ``check_compressed`` is for.
CONSTANT_ALLOWANCE = 0.02  # of the module's bytes ...
CONSTANT_SLACK_BYTES = 16 * 1024  # ... plus this, for tiny models


class OnnxExportError(NescError):
    """The model cannot be exported to ONNX, or the export lost the compression."""


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote.

    tensor_bytes: bytes of every tensor the file stores (initializers and ``Constant`` nodes).
    expected_bytes: what the model itself holds: parameters (pools, dense weights), routing maps and
    other buffers (batch-norm statistics); ``stored_bytes`` counts the first two.
    dense_file_bytes / dense_tensor_bytes: the dense model exported the same way, when one was given.
    """

    path: Path
    file_bytes: int
    tensor_bytes: int
    expected_bytes: int
    stored_bytes: int
    opset: int
    ops: tuple[str, ...]  # ONNX op types in the graph, sorted
    simplified: bool
    dense_file_bytes: int | None = None
    dense_tensor_bytes: int | None = None

    @property
    def file_ratio(self) -> float | None:
        """Dense file size over this file's size, when the dense model was exported."""
        return None if self.dense_file_bytes is None else self.dense_file_bytes / self.file_bytes


def export_onnx(
    frozen: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    *,
    simplify: bool = True,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dense: nn.Module | None = None,
) -> OnnxExport:
    """Export a frozen nesc model to one ONNX file that stores pools and routing maps, not weights.

    ``example_inputs``: a tensor or tuple of tensors with a batch dimension first (a batch of 1 is
    exported at batch 2: torch.export fixes dimensions of size 1). ``dynamic_batch``: the file
    takes any batch size (dimension ``"batch"``). ``dense``: the uncompressed model, exported the same
    way to a temporary file to report its size next to this one.
    """
    inputs = _check_inputs(example_inputs, dynamic_batch)
    path = _check_path(path)
    _check_opset(opset)
    graph = lower(frozen)
    model, ops = _to_onnx(graph, inputs, simplify=simplify, opset=opset, dynamic_batch=dynamic_batch)
    expected = module_bytes(frozen)
    check_compressed(model, expected, what=_name(frozen))
    save(model, path)
    dense_sizes = _dense_sizes(dense, inputs, simplify, opset, dynamic_batch) if dense is not None else (None, None)
    return OnnxExport(path, path.stat().st_size, tensor_bytes(model), expected, stored_bytes(frozen), opset,
                      ops, simplify, *dense_sizes)


# ------------------------------------------------------------------------------------------- steps


def lower(module: nn.Module) -> fx.GraphModule:
    """A copy of ``module`` in eval mode whose nesc ops are rewritten by the passes in ``LOWERINGS``."""
    if not isinstance(module, fx.GraphModule):
        raise InputError(
            f"export_onnx takes a frozen nesc model (an fx.GraphModule from nesc.freeze or nesc.load), got "
            f"{type(module).__name__}; run nesc.transform and nesc.freeze on it first"
        )
    gm = copy.deepcopy(module).eval()
    gm.meta = copy.copy(module.meta)
    present = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    for target, name in LOWERINGS.items():
        if target in present:
            gm = PASSES.get(name)(gm).graph_module
    return gm


def capture(module: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool) -> torch.export.ExportedProgram:
    dims = tuple({0: torch.export.Dim(BATCH)} for _ in inputs) if dynamic_batch else None
    try:
        with torch.no_grad():
            return torch.export.export(module, inputs, dynamic_shapes=dims, strict=False)
    except Exception as e:
        hint = (" If the model fixes its batch size (a reshape to a constant batch), pass dynamic_batch=False."
                if dynamic_batch else "")
        raise OnnxExportError(
            f"export_onnx: torch.export could not capture {_name(module)} on inputs {_shapes(inputs)}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0]}.{hint}"
        ) from e


def check_supported(program: torch.export.ExportedProgram, opset: int) -> None:
    """Raise one error listing every op of ``program`` that torch.onnx cannot translate, with the nodes
    (and modules) that call each; checked before translation, which would stop at the first one.

    Fast path: the captured graph against the exporter's registry (torchlib), its decomposition table
    and the ops' own composite implementations. When that finds a gap, the program is decomposed the
    way the exporter decomposes it (seconds to minutes: as long as the translation) and every op of the
    result is checked, so that ops a decomposition introduces (``cdist`` -> ``_cdist_forward``) are
    listed too. ``translate`` runs the same full check when the exporter fails anyway.
    """
    if _unsupported(program.graph, opset, decomposable=True):
        raise unsupported_error(program, opset)


def unsupported_error(program: torch.export.ExportedProgram, opset: int) -> OnnxExportError | None:
    """The error naming every op of the decomposed ``program`` that has no translation, or None."""
    _, table = _exporter_tables(opset)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as the exporter decomposes
        decomposed = program.run_decompositions(table)
    missing = _unsupported(decomposed.graph, opset, decomposable=False)
    if not missing:
        return None
    lines = [f"  {op}: {len(at)} call(s) at {', '.join(at[:5])}{', ...' if len(at) > 5 else ''}"
             for op, at in sorted(missing.items())]
    return OnnxExportError(
        f"export_onnx: {len(missing)} op(s) have no ONNX translation (torch.onnx, opset {opset}):\n"
        + "\n".join(lines) + "\n"
        "Replace the modules that call them with ops the exporter supports, or keep those parts out of "
        "the exported model."
    )


def _unsupported(graph: fx.Graph, opset: int, decomposable: bool) -> dict[str, list[str]]:
    """op name -> where it is called, for every op without a translation (``decomposable``: an op the
    exporter will decompose counts as supported)."""
    registry, table = _exporter_tables(opset)
    missing: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target in PLUMBING:
            continue
        op = node.target
        if isinstance(op, torch._ops.OpOverload) and (
            registry.is_registered(op)
            or (decomposable and (op in table or op.has_kernel_for_dispatch_key(_COMPOSITE)))
        ):
            continue
        missing[_op_name(op)].append(_where(node))
    return missing


def translate(program: torch.export.ExportedProgram, opset: int) -> onnx.ModelProto:
    # dynamo=True: the TorchScript exporter cannot translate the lowered aten graph (aten::_to_copy).
    # optimize=False: the onnxscript optimizer folds small regenerated weights into constants.
    # external_data=False and f=None: nothing is written here; ``save`` writes one file.
    try:
        onnx_program = torch.onnx.export(program, (), None, dynamo=True, optimize=False, external_data=False,
                                         opset_version=opset, verbose=False, report=False)
    except Exception as e:
        raise unsupported_error(program, opset) or OnnxExportError(
            f"export_onnx: torch.onnx failed to translate the captured graph: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    model = onnx_program.model_proto
    _name_batch(model)
    for node in model.graph.node:
        # Per-node debug records (fx node text, module path, stack trace): a few hundred bytes per
        # node, more than the tensors of a small model; nothing reads them at run time.
        del node.metadata_props[:]
    return model


def _name_batch(model: onnx.ModelProto) -> None:
    """Call the symbolic batch dimension ``BATCH`` everywhere (the exporter names it after its symbol, ``s77``)."""
    dims = [v.type.tensor_type.shape.dim for v in model.graph.input]
    symbol = next((d[0].dim_param for d in dims if len(d) and d[0].dim_param), None)
    if symbol is None:
        return  # static batch
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH


def simplify_model(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    # initializers_as_constants=False is the precise skip: constant folding and the optimizer's
    # value-baking passes (fuse_bn_into_conv) leave every node that reads an initializer, so the
    # regeneration stays; shape arithmetic and aranges are still folded. skip_constant_folding=True
    # would keep the regeneration too, but also every foldable shape computation.
    try:
        simplified, ok = onnxsim.simplify(model, initializers_as_constants=False, check_n=0)
    except Exception as e:
        raise OnnxExportError(f"export_onnx: onnxsim failed on the exported model: {type(e).__name__}: {e}. "
                              f"Export with simplify=False (CLI: --no-simplify).") from e
    if not ok:
        raise OnnxExportError("export_onnx: onnxsim's check of the simplified model failed; export with "
                              "simplify=False (CLI: --no-simplify)")
    return simplified


def constants_as_nodes(model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """Turn the initializers onnxsim created (folded shape vectors and aranges) into ``Constant`` nodes;
    the module's own tensors (``keep``) stay initializers.

    Importers treat initializers as weights: TVM's ``from_onnx(keep_params_in_input=True)`` makes each
    a runtime parameter, and an ``Expand`` whose target shape is a parameter has no static shape. As
    ``Constant`` nodes they are part of the graph, and the file's initializers are exactly the model's
    parameters and buffers: pools, routing maps, what stayed dense.
    """
    _tensor_constants(model)
    derived = [t for t in model.graph.initializer if t.name not in keep]
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"nesc_const_{t.name}", value=t) for t in derived]
    for t in derived:
        model.graph.initializer.remove(t)
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return model


# ``Constant`` attributes other than ``value`` -> the dtype of the tensor they stand for.
_CONSTANT_FORMS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


def _tensor_constants(model: onnx.ModelProto) -> None:
    """Rewrite ``Constant(value_int[s]=..., value_float[s]=...)`` as ``Constant(value=tensor)``: the
    exporter emits both forms, and TVM's importer reads only ``value`` ("no value in Constant")."""
    for node in model.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name not in _CONSTANT_FORMS:
            continue
        attr = node.attribute[0]
        array = np.array(onnx.helper.get_attribute_value(attr), dtype=_CONSTANT_FORMS[attr.name])
        node.ClearField("attribute")
        node.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(array)))


def check_compressed(model: onnx.ModelProto, expected: int, what: str) -> None:
    """The file stores (about) what the frozen module holds; a folded weight makes it grow toward dense."""
    stored = tensor_bytes(model)
    limit = expected * (1 + CONSTANT_ALLOWANCE) + CONSTANT_SLACK_BYTES
    if stored > limit:
        largest = sorted(_tensors(model), key=lambda t: -t[2])[:5]
        listing = ", ".join(f"{name} {list(dims)} ({nbytes:,} B)" for name, dims, nbytes in largest)
        raise OnnxExportError(
            f"export_onnx: the ONNX model of {what} stores {stored:,} bytes of tensors, expected at most "
            f"{int(limit):,} (the frozen module holds {expected:,}): a regenerated weight was folded back into "
            f"a dense constant. Largest tensors: {listing}. Export without the step that folded it "
            f"(simplify=False), and report the tool that folded it."
        )


def save(model: onnx.ModelProto, path: Path) -> None:
    size = model.ByteSize()
    if size >= PROTOBUF_LIMIT:
        raise OnnxExportError(f"export_onnx: the model serialises to {size:,} bytes, over protobuf's 2 GiB limit "
                              f"for one file; nesc writes single-file ONNX only")
    partial = path.with_name(path.name + ".partial")
    onnx.save_model(model, partial)  # below 2 GiB onnx writes every tensor inline: one file
    os.replace(partial, path)


# ------------------------------------------------------------------------------------------ sizes


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor stored in the model: initializers and ``Constant`` node values."""
    return sum(nbytes for _, _, nbytes in _tensors(model))


def module_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor the module holds (parameters and buffers)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        yield t.name, tuple(t.dims), _nbytes(t)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield f"{node.name}:{a.name}", tuple(a.t.dims), _nbytes(a.t)


def _nbytes(t: onnx.TensorProto) -> int:
    numel = 1
    for d in t.dims:
        numel *= d
    return numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def export_dense_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, simplify: bool = True,
                      opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> Path:
    """Export any (dense) model the way ``export_onnx`` exports a frozen one, for size comparisons."""
    inputs, path = _check_inputs(example_inputs, dynamic_batch), _check_path(path)
    _check_opset(opset)
    model_proto, _ = _to_onnx(copy.deepcopy(model).eval(), inputs, simplify=simplify, opset=opset,
                              dynamic_batch=dynamic_batch)
    save(model_proto, path)
    return path


def _dense_sizes(dense: nn.Module, inputs, simplify: bool, opset: int, dynamic_batch: bool) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = export_dense_onnx(dense, inputs, Path(tmp) / "dense.onnx", simplify=simplify, opset=opset,
                                 dynamic_batch=dynamic_batch)
        return path.stat().st_size, tensor_bytes(onnx.load(str(path)))


def _to_onnx(module: nn.Module, inputs, *, simplify: bool, opset: int, dynamic_batch: bool):
    program = capture(module, inputs, dynamic_batch)
    check_supported(program, opset)
    model = translate(program, opset)
    if simplify:
        model = constants_as_nodes(simplify_model(model), keep={t.name for t in model.graph.initializer})
    return model, tuple(sorted({n.op_type for n in model.graph.node}))


# -------------------------------------------------------------------------------------- helpers


@functools.cache
def _exporter_tables(opset: int):
    """torch.onnx's op registry for ``opset`` and the decompositions its exporter applies before
    translating (built once: the registry takes seconds).

    The one place that uses torch.onnx internals (torch is pinned to 2.13.0): these are the tables
    the exporter dispatches on, so checking against them lists exactly the ops it would fail on.
    """
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset)
    implemented = set(_decomp.get_onnx_implemented_overloads(registry))
    return registry, _decomp.create_onnx_friendly_decomposition_table(implemented)


def _check_inputs(example_inputs, dynamic_batch: bool) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    bad = [i for i, x in enumerate(inputs) if not isinstance(x, Tensor)]
    if not inputs or bad:
        raise InputError(
            f"export_onnx: example_inputs must be a tensor or a non-empty tuple of tensors; got "
            f"{[type(x).__name__ for x in inputs]}. Pass e.g. (torch.randn(2, 3, 32, 32),)"
        )
    if dynamic_batch:
        if any(x.dim() == 0 for x in inputs):
            raise InputError("export_onnx: dynamic_batch=True needs a batch dimension on every input; a 0-d "
                             "input has none. Pass dynamic_batch=False.")
        # torch.export specialises a dimension of size 1 to a constant: export a batch of 2.
        inputs = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs)
    return tuple(x.detach() for x in inputs)


def _check_opset(opset) -> None:
    # Below 18 the exporter translates at 18 and down-converts, which fails for some of our ops.
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not DEFAULT_OPSET <= opset <= newest:
        raise InputError(f"export_onnx: opset must be an int from {DEFAULT_OPSET} (torchlib's) to {newest} (the "
                         f"installed onnx's newest); got {opset!r}")


def _check_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"export_onnx: {str(path)!r} is a directory; pass a file path such as {str(path / 'model.onnx')!r}")
    if not path.parent.is_dir():
        raise InputError(f"export_onnx: folder {str(path.parent)!r} does not exist; create it first")
    return path


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    return f"{node.name} (in {module})" if module else f"{node.name} (in the top-level forward)"


def _op_name(target) -> str:
    return target.name() if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs)
