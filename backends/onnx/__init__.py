"""ONNX export that stays compressed: pools and routing maps are the file's tensors, weights are ops.

A frozen nesc model computes each weight with ``torch.ops.nesc.regenerate``. Exported naively, every
tool on the way folds that computation into a dense constant, because all of its inputs are
initializers: the legacy exporter (unless ``do_constant_folding=False``), the dynamo exporter's
optimizer (``optimize=True`` folds the small layers), onnxsim (unless told that initializers are not
constants). onnxruntime should fold it, but in memory, once per session: then the file is small and
the session runs the dense graph. So the route is, one named step per line of ``export_onnx``:

1. ``lower``: run the rewrite pass each nesc op names in ``LOWERINGS`` on a copy of the model
   (``regenerate.DecomposeRegenerateOnnx``: index arithmetic over the pool and the routing map, with
   few weight-sized intermediates, which is what onnxruntime's folding holds in memory at creation);
2. ``capture``: ``torch.export`` with a symbolic batch dimension;
3. ``check_supported``: list *every* op that the exporter's registry (torchlib) can neither translate
   nor decompose in one ``OnnxExportError``, before any translation starts;
4. ``translate``: ``torch.onnx.export(dynamo=True, optimize=False)``; the TorchScript exporter
   (``dynamo=False``) cannot translate the aten ops the lowering produces (``aten::_to_copy``);
   then ``resolve_cast_like``: the exporter's ``CastLike`` nodes become ``Cast`` (same values), the
   one op on the regeneration's path that onnxruntime's constant folder cannot run, so that a default
   onnxruntime session folds every weight once, at creation, and runs at the dense model's speed;
5. ``simplify``: onnxsim with ``initializers_as_constants=False``: it folds shape arithmetic and
   ``Range``s but leaves every node that depends on an initializer, so no weight is baked in;
6. ``check_compressed``: the bytes of every tensor stored in the file (initializers and
   ``Constant`` nodes) must stay at what the frozen module stores, and fail loudly when a folded
   weight brought the dense size back;
7. ``save``: one self-contained file (no ``.onnx.data`` next to it), written through
   ``nesc.core.files``: the path is checked before step 1 (an existing file is replaced only with
   ``overwrite=True``; links, folders and devices never are), and the file appears whole or not at
   all (temporary file, fsync, rename; a full disk is an ``OutputError`` and leaves nothing).

Files: this one holds the entry points (``export_onnx``, ``export_dense_onnx``), their argument
checks and the ``OnnxExport`` report; ``export.py`` the steps (1, 2, 4, 5, 7); ``regenerate.py``,
``decompose_products.py`` and ``dequantize.py`` the lowerings of step 1 (all ``retarget.RetargetNodes``);
``check.py`` the two checks (3, 6),
``OnnxExportError`` and the byte counts; ``runtime.py`` ``ort_session``: an
onnxruntime session that regenerates ``"once"`` (folded at creation: dense speed, dense memory; the
default) or ``"per_call"`` (pools in memory, every run regenerates). Example inputs go through
``nesc.core.inputs``, torch.onnx's internal tables through ``nesc.core.compat``.

Opset 18 (``DEFAULT_OPSET``): the opset torchlib's translations are written for; onnxruntime 1.31 and
TVM's Relax ONNX frontend import it.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from nesc.core import files
from nesc.core.errors import InputError, NescError
from nesc.core.inputs import as_tensors, export_batch
from nesc.report import stored_bytes

try:
    import onnx
    import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates through it)
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise NescError(
        f"nesc's ONNX export needs onnx, onnxscript and onnxsim: pip install 'nesc[onnx]'; import failed with: {e}"
    ) from e

from .check import (  # noqa: E402
    CONSTANT_ALLOWANCE,
    CONSTANT_SLACK_BYTES,
    PLUMBING,
    OnnxExportError,
    check_compressed,
    check_supported,
    module_bytes,
    tensor_bytes,
    unsupported_error,
)
from .export import (  # noqa: E402
    BATCH,
    LOWERINGS,
    PROTOBUF_LIMIT,
    capture,
    has_attention,
    constants_as_nodes,
    lower,
    resolve_cast_like,
    save,
    simplify_model,
    translate,
)
from .runtime import REGENERATE, ort_session  # noqa: E402

__all__ = [
    "BATCH", "CONSTANT_ALLOWANCE", "CONSTANT_SLACK_BYTES", "DEFAULT_OPSET", "LOWERINGS", "PLUMBING",
    "PROTOBUF_LIMIT", "REGENERATE", "OnnxExport", "OnnxExportError", "capture", "check_compressed",
    "check_supported", "constants_as_nodes", "export_dense_onnx", "export_onnx", "lower", "module_bytes",
    "ort_session", "resolve_cast_like", "save", "simplify_model", "tensor_bytes", "translate",
    "unsupported_error",
]

DEFAULT_OPSET = 18


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
    overwrite: bool = False,
) -> OnnxExport:
    """Export a frozen nesc model to one ONNX file that stores pools and routing maps, not weights.

    ``example_inputs``: a tensor or tuple of tensors with a batch dimension first (a batch of 1 is
    exported at batch 2: torch.export fixes dimensions of size 1). ``dynamic_batch``: the file
    takes any batch size (dimension ``"batch"``). ``dense``: the uncompressed model, exported the same
    way to a temporary file to report its size next to this one. ``overwrite``: replace an existing
    file at ``path`` (otherwise an ``OutputError``, raised before any work).
    """
    inputs = _check_inputs(example_inputs, dynamic_batch)
    path = _check_path(path, overwrite)
    _check_opset(opset)
    graph = lower(frozen)
    model, ops = _to_onnx(graph, inputs, simplify=simplify, opset=opset, dynamic_batch=dynamic_batch)
    expected = module_bytes(frozen)
    check_compressed(model, expected, what=type(frozen).__name__)
    save(model, path, overwrite=overwrite)
    dense_sizes = _dense_sizes(dense, inputs, simplify, opset, dynamic_batch) if dense is not None else (None, None)
    return OnnxExport(path, path.stat().st_size, tensor_bytes(model), expected, stored_bytes(frozen), opset,
                      ops, simplify, *dense_sizes)


def export_dense_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, simplify: bool = True,
                      opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, overwrite: bool = False) -> Path:
    """Export any (dense) model the way ``export_onnx`` exports a frozen one, for size comparisons."""
    inputs, path = _check_inputs(example_inputs, dynamic_batch), _check_path(path, overwrite)
    _check_opset(opset)
    model_proto, _ = _to_onnx(copy.deepcopy(model).eval(), inputs, simplify=simplify, opset=opset,
                              dynamic_batch=dynamic_batch)
    save(model_proto, path, overwrite=overwrite)
    return path


def _dense_sizes(dense: nn.Module, inputs, simplify: bool, opset: int, dynamic_batch: bool) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = export_dense_onnx(dense, inputs, Path(tmp) / "dense.onnx", simplify=simplify, opset=opset,
                                 dynamic_batch=dynamic_batch)
        return path.stat().st_size, tensor_bytes(onnx.load(str(path)))


def _to_onnx(module: nn.Module, inputs, *, simplify: bool, opset: int, dynamic_batch: bool):
    """Steps 2-5 (the steps are looked up here, in the package, so that one can be swapped for a test)."""
    program = capture(module, inputs, dynamic_batch)
    check_supported(program, opset)
    try:
        translated = translate(program, opset)
    except OnnxExportError:
        if not has_attention(program):
            raise
        # The exporter's decomposition of the fused attention fails on some graphs (full T5): its math
        # kernel instead (exact where the fused op's translation would have been; see export._attention_math).
        translated = translate(capture(module, inputs, dynamic_batch, attention_math=True), opset)
    model = resolve_cast_like(translated)
    if simplify:
        model = constants_as_nodes(simplify_model(model), keep={t.name for t in model.graph.initializer})
    return model, tuple(sorted({n.op_type for n in model.graph.node}))


# ------------------------------------------------------------------------------------- arguments


def _check_inputs(example_inputs, dynamic_batch: bool) -> tuple[Tensor, ...]:
    inputs = as_tensors(example_inputs, "export_onnx", error=InputError)
    if dynamic_batch:
        if any(x.dim() == 0 for x in inputs):
            raise InputError("export_onnx: dynamic_batch=True needs a batch dimension on every input; a 0-d "
                             "input has none. Pass dynamic_batch=False.")
        inputs = export_batch(inputs)  # torch.export specialises a dimension of size 1: export a batch of 2
    return tuple(x.detach() for x in inputs)


def _check_opset(opset) -> None:
    # Below 18 the exporter translates at 18 and down-converts, which fails for some of our ops.
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not DEFAULT_OPSET <= opset <= newest:
        raise InputError(f"export_onnx: opset must be an int from {DEFAULT_OPSET} (torchlib's) to {newest} (the "
                         f"installed onnx's newest); got {opset!r}")


def _check_path(path, overwrite: bool) -> Path:
    """Refuse ``path`` before any work: an InputError for a folder or a missing folder, an OutputError
    (``files.check_output``) for an existing file without ``overwrite``, a link or a device."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"export_onnx: {str(path)!r} is a directory; pass a file path such as "
                         f"{str(path / 'model.onnx')!r}")
    if not path.parent.is_dir():
        raise InputError(f"export_onnx: folder {str(path.parent)!r} does not exist; create it first")
    return files.check_output(path, overwrite=overwrite, what="ONNX file")
