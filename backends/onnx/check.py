"""What the ONNX export refuses, and how it proves the file stayed compressed.

* ``check_supported``: before translation, every op of the captured program that torch.onnx can
  neither translate nor decompose, listed in one ``OnnxExportError`` with the nodes (and modules) that
  call it (the exporter itself stops at the first one). The tables it checks against are the
  exporter's own (``nesc.core.compat.onnx_exporter_tables``), so it lists exactly what would fail.
* ``check_compressed``: the bytes of every tensor stored in the file (initializers and ``Constant``
  nodes) must stay at what the frozen module holds (``module_bytes``); a folded weight brings the
  dense size back and fails loudly, naming the largest tensors.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import onnx
import torch
from torch import fx, nn

from nesc.core import compat
from nesc.core.errors import NescError

# Graph plumbing that torch.onnx translates itself, outside its op registry (tuple outputs, symbolic
# sizes and the arithmetic on them, runtime assertions it removes).
PLUMBING: frozenset = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min,
    torch.ops.aten.sym_size.int, torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten._assert_tensor_metadata.default,
})

# Extra bytes a simplified file may store beyond the frozen module's own tensors: the aranges of the
# window indices and shape vectors, which onnxsim folds into small initializers. A folded weight is
# orders of magnitude more (its whole block grid), which is what ``check_compressed`` is for.
CONSTANT_ALLOWANCE = 0.02  # of the module's bytes ...
CONSTANT_SLACK_BYTES = 16 * 1024  # ... plus this, for tiny models


class OnnxExportError(NescError):
    """The model cannot be exported to ONNX, or the export lost the compression."""


# -------------------------------------------------------------------------------- supported ops


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
    _, table = compat.onnx_exporter_tables(opset)
    with compat.size_oblivious_export():  # as the exporter decomposes
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
    registry, table = compat.onnx_exporter_tables(opset)
    missing: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target in PLUMBING:
            continue
        op = node.target
        if compat.is_op_overload(op) and (
            registry.is_registered(op) or (decomposable and (op in table or compat.has_composite_kernel(op)))
        ):
            continue
        missing[_op_name(op)].append(_where(node))
    return missing


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    return f"{node.name} (in {module})" if module else f"{node.name} (in the top-level forward)"


def _op_name(target) -> str:
    return target.name() if compat.is_op_overload(target) else getattr(target, "__name__", str(target))


# --------------------------------------------------------------------------------- stored bytes


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
    """(name, dims, bytes) of every initializer and every tensor-valued node attribute."""
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
