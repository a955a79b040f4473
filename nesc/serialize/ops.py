"""The calls an artifact's graph may make: an allow-list of pure ops, in one place.

A graph read from a file can only call what is listed here, so no artifact can reach an op that
touches files (``aten::from_file``, ``aten::save``), processes, the network or global state
(RNG seeding, ``_set_*`` flags), whatever its bytes say:

* ``ALLOWED_OPS``: aten / nesc operator packets, any overload except ``.out`` variants (they write
  into a caller-given tensor). The list is what capture + freeze produce for every registry model and
  the Hugging Face models the suite builds (``tests/nesc/serialize/test_ops.py`` checks that every
  such frozen graph stays inside it), plus the pure ops of the same families those models are made of.
  A pure op missing here fails at ``nesc.save`` with a message naming it: add it here after checking
  its schema has no side effect.
* ``INPLACE_OPS``: in-place activations and arithmetic that ``torch.export`` keeps for
  ``inplace=True`` modules. The loader lets them write only into tensors the graph computed itself,
  never into an input or a stored tensor (``schema.check_mutations``).
* ``PY_FUNCTIONS``: Python callables an exported graph calls for symbolic shapes and tuple outputs,
  by name: an explicit list, not "anything in operator" (``operator.attrgetter`` / ``methodcaller``
  / ``call`` would reach arbitrary Python).
"""

from __future__ import annotations

import math
import operator

import torch

from nesc.core import compat

_ATEN = """
    abs absolute acos acosh add addcdiv addcmul addmm addmv alias all amax amin aminmax any arange argmax
    argmin asin asinh atan atan2 atanh avg_pool1d avg_pool2d avg_pool3d baddbmm batch_norm bitwise_and
    bitwise_not bitwise_or bitwise_xor bmm broadcast_to cat ceil celu chunk clamp clamp_max clamp_min clip
    clone constant_pad_nd contiguous conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
    convolution copy cos cosh cumprod cumsum detach diff div dropout elu embedding eq erf
    exp expand expand_as expm1 feature_dropout fill flatten flip floor floor_divide fmod full full_like gather
    ge gelu glu group_norm gt hardsigmoid hardswish hardtanh index index_select instance_norm isinf isnan
    layer_norm le leaky_relu lerp linear log log10 log1p log2 log_softmax logical_and logical_not logical_or
    logical_xor lt masked_fill matmul max max_pool1d max_pool2d max_pool3d maximum mean min minimum mish mm mul
    narrow native_batch_norm native_dropout native_group_norm native_layer_norm ne neg new_full
    new_ones new_zeros norm ones ones_like pad permute pixel_shuffle pixel_unshuffle pow prelu prod reciprocal
    reflection_pad1d reflection_pad2d relu relu6 remainder repeat repeat_interleave replication_pad1d
    replication_pad2d reshape roll round rsqrt rsub scalar_tensor scaled_dot_product_attention select selu
    sigmoid sign silu sin sinh slice softmax softplus split split_with_sizes sqrt square squeeze stack std sub
    sum sym_size sym_numel sym_stride t tan tanh tensor_split tile to topk transpose tril triu type_as unbind
    unflatten unsqueeze upsample_bilinear2d upsample_nearest2d var view view_as where zeros zeros_like
    _native_batch_norm_legit_no_training _softmax _log_softmax _to_copy _unsafe_view _assert_tensor_metadata
    _assert_scalar adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d __and__
    __or__ __xor__ __lshift__ __rshift__ einsum reshape_as _weight_norm _weight_norm_interface norm_except_dim
    linalg_vector_norm swapaxes swapdims movedim moveaxis ravel hsplit vsplit dsplit diagonal unfold argsort sort
    cummax cummin logsumexp outer dot kron cross bucketize erfinv erfc hypot logit nan_to_num frac trunc fix exp2
    hardshrink softshrink threshold log_sigmoid take_along_dim flipud fliplr rot90 sgn signbit isfinite isclose
    fmin fmax true_divide unsafe_split unsafe_chunk mT eye fft_fft fft_ifft fft_fft2 fft_ifft2 fft_fftn fft_ifftn
    fft_rfft fft_irfft fft_rfft2 fft_irfft2 fft_rfftn fft_irfftn real imag view_as_real view_as_complex
"""
# In-place variants export keeps (nn.ReLU(inplace=True), ...); see ``schema.check_mutations``.
INPLACE_OPS = frozenset(f"aten::{n}" for n in """
    relu_ relu6_ hardtanh_ silu_ gelu_ sigmoid_ tanh_ leaky_relu_ elu_ hardswish_ hardsigmoid_ mish_ add_ mul_
    sub_ div_ clamp_ clamp_min_ clamp_max_ masked_fill_ fill_ dropout_ zero_
""".split())
# nesc's ops (nesc.core.modules, nesc.core.quant: pure, no state but the inference cache, which never
# outlives what it was built from), and torch's own dequantisation of an int8 pool, which files written
# before nesc::dequantize call (nesc.core.quant registers it; the loader rewrites it, ``upgrade``).
ALLOWED_OPS = frozenset(f"aten::{n}" for n in _ATEN.split()) | INPLACE_OPS | {
    "nesc::regenerate", "nesc::gather_products", "nesc::dequantize", "quantized_decomposed::dequantize_per_channel"}

PY_FUNCTIONS = {
    f"operator.{n}": getattr(operator, n)
    for n in "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor "
    "not_ invert lshift rshift".split()
}
PY_FUNCTIONS |= {f"math.{n}": getattr(math, n) for n in
                 "ceil floor trunc sqrt exp log log2 log10 pow fabs gcd isfinite isinf isnan".split()}
PY_FUNCTIONS |= {f"torch.{n}": getattr(torch, n) for n in dir(torch) if n.startswith(("sym_", "_sym_"))}
PY_NAMES = {id(fn): name for name, fn in PY_FUNCTIONS.items()}


def packet_name(op) -> str:
    """``aten::conv2d`` for ``torch.ops.aten.conv2d.padding``."""
    namespace, opname, _ = compat.op_overload_name(op)
    return f"{namespace}::{opname}"


def refusal(op) -> str | None:
    """Why an op overload may not appear in an artifact, or None when it may."""
    namespace, opname, overload = compat.op_overload_name(op)
    if f"{namespace}::{opname}" not in ALLOWED_OPS:
        return (f"{namespace}::{opname} is not on nesc's allow-list of pure ops (nesc.serialize.ops.ALLOWED_OPS); "
                f"if it has no side effect (no file, process, network or global state), add it there")
    if overload == "out" or "out" in compat.mutated_arguments(op):
        return f"{namespace}::{opname}.{overload} writes into a caller-given tensor (an .out variant)"
    return None


def resolve(text: str):
    """The callable an encoded target names, if it is allowed; ``LookupError`` says why not."""
    if text in PY_FUNCTIONS:
        return PY_FUNCTIONS[text]
    namespace, sep, rest = text.partition("::")
    opname, dot, overload = rest.rpartition(".")
    if not (sep and dot and namespace.isidentifier() and opname.isidentifier() and overload.isidentifier()):
        raise LookupError(f"{text!r} is neither 'namespace::op.overload' nor an allowed Python function "
                          f"({', '.join(sorted(PY_FUNCTIONS)[:4])}, ...)")
    if f"{namespace}::{opname}" not in ALLOWED_OPS:  # checked before looking anything up in torch.ops
        raise LookupError(f"{namespace}::{opname} is not on nesc's allow-list of pure ops")
    try:
        fn = getattr(getattr(getattr(torch.ops, namespace), opname), overload)
    except (AttributeError, RuntimeError) as e:
        raise LookupError(f"unknown operator {text!r} in this torch") from e
    if not compat.is_op_overload(fn):
        raise LookupError(f"{text!r} is not an operator overload")
    why = refusal(fn)
    if why is not None:
        raise LookupError(why)
    return fn
