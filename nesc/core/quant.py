"""Quantized pools: a frozen model's pools stored as int8 (symmetric, one scale per pool row), float16
or bfloat16, and dequantised in the graph just before the regeneration reads them.

A pool is ``(Op, Ip, Kh, Kw)``; every output channel of every weight it serves reads whole pool rows
(``o`` wraps modulo ``Op``), so one scale per pool row (axis 0) is the per-output-channel scale of
the pool, the axis torch's per-channel weight quantization uses. int8 is symmetric with the
restricted range ``[-127, 127]``: zero point 0, ``scale = amax(|row|) / 127`` (torch's
``PerChannelMinMaxObserver`` with ``per_channel_symmetric``).

In the graph (``passes.quantize_pools`` writes it; everything after the dequantisation is unchanged)::

    int8:    %q = get_attr[<pool>.values]; %s = get_attr[<pool>.scale]     (int8 (Op,Ip,Kh,Kw), float32 (Op,))
             %pool = nesc.dequantize(%q, %s, torch.float32)
    float16: %q = get_attr[<pool>.values]; %pool = nesc.dequantize(%q, None, torch.float32)
             %w = nesc.regenerate(%pool, %starts, %fracs, %scale, ...)

``torch.ops.nesc.dequantize`` (``dequantize_op``) is nesc's own ``torch.library`` custom op with the
meaning of torch's ``quantized_decomposed.dequantize_per_channel(q, s, None, 0, -127, 127, torch.int8,
out_dtype=dtype)`` (int8) or of a cast (float16 / bfloat16), and the same values bit for bit
(``dequantize_reference`` computes it with torch's ops). Why an op of our own rather than torch's:

* the cache (``nesc.core.cache``): in inference the dequantised pool is the same tensor every call
  while the stored values and scales are the same objects at the same versions, so the regenerate
  nodes after it find their weights cached too. Through torch's op the pool was a new tensor every
  call and every weight was rebuilt every call (measured at batch 32: eager int8 1.7x (resnet_fmnist) to
  4.5x (mlp) slower than fp32 pools);
* ``torch.compile``: inductor runs the op as an extern kernel (its fake kernel gives the shape), while
  its lowering of torch's op fails on the ``None`` zero points (one zero-point tensor per pool would
  be stored bytes, or a graph constant, for nothing: the zero point is 0 by construction);
* one node per pool read that every consumer recognises (``pool_read``), whatever the dtype: torch.export
  keeps it whole; ONNX export spells it as torch's op again (``DequantizeLinear``; a cast: ``Cast``),
  TVM reads the stored values into its regeneration kernel, the artifact allow-list names it.

Files written before it (format 4 with torch's op, or ``aten._to_copy``, feeding ``nesc.regenerate``)
are rewritten into this form when they load (``nesc.serialize.upgrade.legacy_dequantizations``).
The pool's place in the module tree is kept: the parameter ``<pool>`` becomes a ``QuantizedPool``
module at the same path.

Quantisation-aware fine-tuning (``prepare_qat``) puts torch's ``FakeQuantize`` (per-channel
symmetric, the same range) on every pool a trainable sampler reads, through a forward pre-hook on
the samplers; ``nesc.freeze(gm, pool_dtype=torch.int8)`` then quantises with the scales it learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver

from . import names
from .cache import cached
from .compat import keep_precision_on_cast, quantized_decomposed_ops
from .errors import ConfigError

POOL_DTYPES = (torch.int8, torch.float16, torch.bfloat16)
QMIN, QMAX = -127, 127  # symmetric: -128 unused, so that a row's largest magnitude maps to exactly 127
AXIS = 0  # one scale per pool row
_Q = quantized_decomposed_ops()
# The forms files written before ``nesc.dequantize`` use (``nesc.serialize.upgrade``; ONNX export's spelling).
LEGACY_DEQUANTIZE = _Q.dequantize_per_channel.default
CAST = torch.ops.aten._to_copy.default
FAKE_QUANT = names.POOL_FAKE_QUANT  # the child of a sampler that prepare_qat adds


def check_pool_dtype(dtype) -> torch.dtype:
    if dtype not in POOL_DTYPES:
        raise ConfigError(f"pool_dtype must be one of {', '.join(map(str, POOL_DTYPES))} (or None: keep the pools' "
                          f"dtype), got {dtype!r}")
    return dtype


def _observer_args() -> dict:
    return dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=QMIN, quant_max=QMAX, ch_axis=AXIS)


def row_scales(pool: Tensor) -> Tensor:
    """Per-row symmetric int8 scales of ``pool``, float32 ``(Op,)``: torch's per-channel observer."""
    observer = PerChannelMinMaxObserver(**_observer_args())
    observer(pool.detach().float())
    scale, _ = observer.calculate_qparams()
    return scale.float()


@keep_precision_on_cast("scale")
class QuantizedPool(nn.Module):
    """A pool as stored: ``values`` (int8, float16 or bfloat16, the pool's shape) and, for int8, the
    float32 ``scale`` per pool row. A passive container: the graph reads both through get_attr."""

    def __init__(self, values: Tensor, scale: Tensor | None = None):
        super().__init__()
        self.register_buffer("values", values)
        if scale is not None:
            self.register_buffer("scale", scale)

    def extra_repr(self) -> str:
        return f"{self.values.dtype} {tuple(self.values.shape)}"


def quantize(pool: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> QuantizedPool:
    """``pool`` in ``dtype``; int8 with ``scale`` (float ``(Op,)``; default: ``row_scales``)."""
    check_pool_dtype(dtype)
    pool = pool.detach()
    if dtype != torch.int8:
        return QuantizedPool(pool.to(dtype).clone())
    scale = (row_scales(pool) if scale is None else scale.detach()).float().clone()
    if scale.shape != pool.shape[:1] or not bool((scale > 0).all()):
        raise ConfigError(f"int8 pool scales must be positive, one per pool row {tuple(pool.shape[:1])}, got "
                          f"{tuple(scale.shape)}")
    zero = torch.zeros(scale.shape, dtype=torch.int64)
    values = _Q.quantize_per_channel.default(pool.float(), scale, zero, AXIS, QMIN, QMAX, torch.int8)
    return QuantizedPool(values, scale)


def dequantize_reference(values: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """What ``nesc.dequantize`` computes, with torch's ops and no cache: int8 ``values`` times their row's
    ``scale`` (torch's per-channel dequantisation, zero point 0, axis 0), or a float16 / bfloat16 cast
    (``scale`` None), in ``dtype``. The ONNX export retargets the op to this (``DequantizeLinear``, ``Cast``)."""
    if scale is None:
        return CAST(values, dtype=dtype)
    return LEGACY_DEQUANTIZE(values, scale, None, AXIS, QMIN, QMAX, torch.int8, out_dtype=dtype)


@torch.library.custom_op("nesc::dequantize", mutates_args=())
def dequantize_op(values: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """A stored pool in its compute ``dtype`` (``dequantize_reference``). In inference it comes from
    ``nesc.core.cache`` while ``values`` and ``scale`` are the same tensors at the same versions (an
    in-place write to either, ``copy_`` or ``load_state_dict``, rebuilds it); the cached pool is built
    outside inference mode, a tensor with a version counter, so the regenerate nodes reading it can be
    cached under ``torch.inference_mode()`` too. Memory: one float pool per stored pool (a fraction of the
    regenerated weights the cache already keeps)."""
    inputs = (values,) if scale is None else (values, scale)
    return cached(values, inputs, ("dequantize", dtype), lambda: _versioned(values, scale, dtype))


def _versioned(values: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return dequantize_reference(values, scale, dtype)


@dequantize_op.register_fake
def _dequantize_fake(values, scale, dtype):
    return values.new_empty(values.shape, dtype=dtype)


DEQUANTIZE = torch.ops.nesc.dequantize.default


def is_dequantize(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is DEQUANTIZE


def dequantize_node(graph: fx.Graph, values: fx.Node, scale: fx.Node | None, dtype: torch.dtype) -> fx.Node:
    """The node that turns stored ``values`` (and ``scale``) back into the ``dtype`` pool."""
    return graph.call_function(DEQUANTIZE, (values, scale, dtype))


@dataclass(frozen=True)
class PoolRead:
    """How a regenerate node reads its pool: the stored tensor(s) and the dequantisation between."""

    values: fx.Node  # get_attr of the pool (a parameter) or of a QuantizedPool's values
    scale: fx.Node | None = None  # get_attr of the int8 scales
    dequantize: fx.Node | None = None  # the dequantize / cast node, None for a plain pool


def pool_read(arg) -> PoolRead | None:
    """What a regenerate node's pool argument reads, or None when it is neither a stored pool nor a
    ``nesc.dequantize`` of stored values (and scales) (``passes.quantize_pools``' two forms)."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        return PoolRead(arg)
    if not is_dequantize(arg) or len(arg.args) != 3 or arg.kwargs:
        return None
    values, scale, _ = arg.args
    stored = (values,) if scale is None else (values, scale)
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stored):
        return None
    return PoolRead(values, scale, arg)


def fake_quantizer() -> FakeQuantize:
    """torch's fake-quantizer for a pool: per-row symmetric int8 with a moving-average observer."""
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, **_observer_args())


def fake_quant_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a training module whose first input is a pool: fake-quantise that pool."""
    return (getattr(module, FAKE_QUANT)(args[0]), *args[1:])


def pool_problem(read: PoolRead, values: Tensor, scale: Tensor | None) -> str | None:
    """What is wrong with a stored pool read through ``read`` (an untrusted file's), or None: the
    dequantisation has the arguments ``dequantize_node`` writes and computes a float dtype, the values
    have the dtype its form needs (float16 / bfloat16 without scales, int8 with them) and int8 scales
    are one positive finite float32 per pool row."""
    node = read.dequantize
    if node is None:
        return None if values.is_floating_point() else f"the pool is {values.dtype}, not a float, and is not dequantized"
    if len(node.args) != 3 or node.kwargs:
        return f"nesc.dequantize takes (values, scale or None, dtype) positionally, got {node.args} {node.kwargs}"
    want = node.args[2]
    if not (isinstance(want, torch.dtype) and want.is_floating_point):
        return f"a pool's dequantisation must compute a float dtype, got {want!r}"
    if node.args[1] is None:
        if values.dtype not in POOL_DTYPES[1:]:
            return f"a cast pool must be stored as float16 / bfloat16 and cast to a float, got {values.dtype} -> {want}"
        return None
    if values.dtype != torch.int8 or values.dim() != 4:
        return f"an int8 pool's values must be int8 of 4 dimensions, got {values.dtype} {tuple(values.shape)}"
    if (scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != tuple(values.shape[:1])
            or not bool((torch.isfinite(scale) & (scale > 0)).all())):
        got = "none" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        return f"an int8 pool's scales must be positive finite float32 of shape {tuple(values.shape[:1])}, got {got}"
    return None
