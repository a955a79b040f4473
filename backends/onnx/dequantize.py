"""dequantize_onnx (rewrite, ONNX export only): spell every ``nesc.dequantize`` node (a quantized
pool's read, ``nesc.core.quant``) as ``quant.dequantize_reference``: torch's own ops, which torchlib
translates.

torch.onnx does not know the custom op; it knows torch's: int8 pools become
``quantized_decomposed.dequantize_per_channel`` (``DequantizeLinear`` with axis 0, the file's int8
initializer and its float32 scales), float16 / bfloat16 pools ``aten._to_copy`` (``Cast``). The node
keeps its arguments, so the file stores the pool in its dtype and dequantises it in the graph, as
eager does; nothing float-sized is stored for it.

Requires: a frozen graph; each dequantize node reads its values through ``get_attr``. Ensures: no
``nesc.dequantize`` node is left; the graph lints; outputs equal the frozen graph's bit for bit (the
op's eager kernel is the same function, cached); no ``get_attr`` added.

    before:  %p = call_function[nesc.dequantize](%values, %scale, torch.float32)
    after:   %p = call_function[dequantize_reference](%values, %scale, torch.float32)
             (captured by torch.export as quantized_decomposed.dequantize_per_channel, or _to_copy)
"""

from __future__ import annotations

from torch import fx

from nesc.core.quant import dequantize_reference, is_dequantize
from nesc.passes.infra import PassResult

from .retarget import RetargetNodes


class DequantizeOnnx(RetargetNodes):
    name = "dequantize_onnx"
    matches = staticmethod(is_dequantize)
    target = staticmethod(dequantize_reference)
    stored = {0: "pool's stored values"}
    what, op = "quantized pools", "dequantize"


def dequantize_onnx(gm: fx.GraphModule) -> PassResult:
    """``DequantizeOnnx()(gm)``: the pass as a plain function."""
    return DequantizeOnnx()(gm)
