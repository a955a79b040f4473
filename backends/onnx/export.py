"""The steps of ``export_onnx``, one function each, in the order it runs them.

1. ``lower``: a copy of the model whose nesc ops are rewritten by the pass each names in ``LOWERINGS``
   (``regenerate.DecomposeRegenerateOnnx``: index arithmetic over the pool and the routing map, in
   the form onnxruntime folds with the fewest weight-sized intermediates;
   ``decompose_products.DecomposeGatherProducts``: the product map as gathers and a lerp;
   ``dequantize.DequantizeOnnx``: a quantized pool's read as torch's dequantisation or cast);
2. ``capture``: ``torch.export`` with the batch dimension named ``BATCH`` (``nesc.core.inputs``);
3. (``check.check_supported``);
4. ``translate``: ``torch.onnx.export(dynamo=True, optimize=False)``;
4b. ``resolve_cast_like``: every ``CastLike`` whose target type is known becomes a ``Cast``, so that
   onnxruntime folds the regeneration into dense weights once, when it creates a session;
5. ``simplify_model``: onnxsim, told that initializers are not constants;
6. ``constants_as_nodes``: onnxsim's folded shape vectors become ``Constant`` nodes, so that the
   file's initializers are exactly the module's tensors;
7. (``check.check_compressed``), then ``save``: one file, no ``.onnx.data`` next to it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, fx, nn

from nesc.capture import views_as_reshapes
from nesc.core import files, names
from nesc.core.errors import InputError
from nesc.core.inputs import batch_dims
from nesc.passes import pipeline
from nesc.passes.infra import NescPass

from .check import OnnxExportError, unsupported_error
from .decompose_products import DecomposeGatherProducts
from .dequantize import DequantizeOnnx
from .regenerate import DecomposeRegenerateOnnx

BATCH = "batch"  # name of the symbolic batch dimension in the exported file
PROTOBUF_LIMIT = 2**31  # a single-file ONNX model must serialise under 2 GiB

# nesc's own ops -> the rewrite pass that turns them into ops the exporter knows: a name in
# nesc.passes.pipeline.PASSES, or a pass of this backend (a NescPass class) for an op only exporters
# need spelled out. Run in this order on a copy of the model before capture.
# (The regeneration first: its requirements read a quantized pool through its nesc.dequantize node.)
LOWERINGS: dict[object, str | type[NescPass]] = {
    torch.ops.nesc.regenerate.default: DecomposeRegenerateOnnx,
    torch.ops.nesc.gather_products.default: DecomposeGatherProducts,
    torch.ops.nesc.dequantize.default: DequantizeOnnx,
}


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
    for target, lowering in LOWERINGS.items():
        if target in present:  # a registered pass runs through the pipeline (lint, its note on failure)
            gm = pipeline.run(gm, [lowering]) if isinstance(lowering, str) else lowering()(gm).graph_module
    return gm


def capture(module: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool,
            attention_math: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module``; with ``dynamic_batch`` dimension 0 of every input is ``BATCH``
    (the inputs come through ``nesc.core.inputs.export_batch``: no batch of 1)."""
    dims = batch_dims(inputs, dim=torch.export.Dim(BATCH)) if dynamic_batch else None
    try:
        with torch.no_grad():
            program = torch.export.export(module, inputs, dynamic_shapes=dims, strict=False)
            if attention_math and has_attention(program):
                views_as_reshapes(program.graph_module)  # valid for the fused kernel's layout only
                program = program.run_decompositions({SDPA: _attention_math})
        return program
    except Exception as e:
        hint = (" If the model fixes its batch size (a reshape to a constant batch), pass dynamic_batch=False."
                if dynamic_batch else "")
        raise OnnxExportError(
            f"export_onnx: torch.export could not capture {type(module).__name__} on inputs {_shapes(inputs)}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0]}.{hint}"
        ) from e


SDPA = torch.ops.aten.scaled_dot_product_attention.default


def has_attention(program: torch.export.ExportedProgram) -> bool:
    return any(n.target is SDPA for n in program.graph.nodes)


def _attention_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` as its math kernel (matmuls and a softmax), decomposed before
    the exporter's own decompositions; used only where the exporter fails on the fused op (full T5):
    on causal decoders (GPT-2, Llama) the translated math kernel disagrees with the model (0.04-0.5
    relative), while the exporter's own translation of the fused op is exact. Those give the fused attention a fake output layout other than
    the kernel's, and a reshape of its output that export recorded as a view (Hugging Face's
    ``attn.transpose(1, 2).reshape(B, S, -1)``; a ``.contiguous().view`` whose copy export dropped)
    then fails ("Cannot view a tensor with shape ..."). The views become reshapes first
    (``nesc.capture.views_as_reshapes``), so the math kernel's own layout decides."""
    return torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


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


def resolve_cast_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``CastLike(x, like)`` as ``Cast(x, to=<like's element type>)`` wherever that type is known
    (graph inputs, initializers, ``Constant`` values, the exporter's ``value_info``, ONNX shape
    inference); returns ``model``, changed in place. The same values: the type is all ``CastLike``
    reads of ``like``.

    torchlib spells scalar-to-tensor casts (``where``, ``clamp``, ``lerp``) as ``CastLike``, which
    onnxruntime's CPU provider runs only as its function body: its constant folder finds no kernel
    for the node ("Could not find a CPU kernel and hence can't constant fold CastLike"), and every
    node after it (the whole regeneration: index, gather, interpolation) is recomputed on every
    run. With plain ``Cast`` it folds each regenerated weight into a dense initializer when the
    session is created (graph optimization level basic and up, the default), in memory only.
    """
    casts = [n for n in model.graph.node if n.op_type == "CastLike" and n.domain in ("", "ai.onnx")]
    if not casts:
        return model
    types = _element_types(model)
    for node in casts:
        to = types.get(node.input[1], onnx.TensorProto.UNDEFINED)
        if to == onnx.TensorProto.UNDEFINED:
            continue  # unknown here; stays CastLike (correct, only not foldable by onnxruntime)
        node.op_type = "Cast"
        del node.input[1:]
        node.attribute.append(onnx.helper.make_attribute("to", to))
    return model


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Value name -> ONNX element type, for every value whose type the model states or implies."""
    graph = model.graph
    try:  # shape inference fills value_info for what the exporter left out; it needs a < 2 GiB proto
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # noqa: BLE001 - best effort: the stated types below still apply
        inferred = []
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred, *graph.value_info, *graph.input, *graph.output] if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


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
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"{names.ONNX_CONST_PREFIX}_{t.name}", value=t)
             for t in derived]
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


def save(model: onnx.ModelProto, path: Path, *, overwrite: bool = False) -> None:
    """One file, written whole or not at all (``files.atomic_write``); an existing one is replaced only
    with ``overwrite=True``, a link or a device never."""
    size = model.ByteSize()
    if size >= PROTOBUF_LIMIT:
        raise OnnxExportError(f"export_onnx: the model serialises to {size:,} bytes, over protobuf's 2 GiB limit "
                              f"for one file; nesc writes single-file ONNX only")
    # below 2 GiB onnx writes every tensor inline: one file; format=protobuf, whatever the temporary name
    files.atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp), format="protobuf"), overwrite=overwrite,
                       what="ONNX file")


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs)
