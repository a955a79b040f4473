"""Relax pass: inference batch norm as one multiply-add per element, its scale and shift per channel.

Rewrites every ``relax.nn.batch_norm`` whose statistics are used as they are (inference: the
triple's first item only) into

    scale = gamma / sqrt(var + eps);  shift = beta - mean * scale     # per channel: C elements
    y = x * scale + shift                                               # per element

where relax's ``DecomposeOpsForInference`` writes ``(x - mean) / sqrt(var + eps) * gamma + beta``,
which the convolution before it evaluates per output element in its epilogue: a square root and a
division for every element (a 1x1 convolution of 16 input channels spent about 40% of its time
there). Requires nothing of the graph (a batch norm without ``center``/``scale`` has no
gamma/beta and is left as it is); guarantees the same outputs up to float rounding (``scale`` is
rounded once more before it multiplies). The statistics stay parameters: nothing is folded into a
weight, so a shared pool and the exported parameters are untouched. Every ``bn[0]`` of a rewritten
batch norm reads ``y`` itself (no tuple, no alias binding), so that FuseOps fuses the activation
after it into the convolution's epilogue.
"""

from __future__ import annotations

from .adapter import relax, tvm

_BATCH_NORM = "relax.nn.batch_norm"


@relax.expr_functor.mutator
class _ScaleShift(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == _BATCH_NORM):
            return call
        attrs = call.attrs
        if not (attrs.center and attrs.scale) or attrs.training:
            return call
        x, gamma, beta, mean, var = call.args
        rank, axis = x.ty.ndim, int(attrs.axis)
        axis = axis + rank if axis < 0 else axis
        eps = relax.const(float(attrs.epsilon), x.ty.dtype)
        scale = self.builder_.emit(relax.op.divide(gamma, relax.op.sqrt(relax.op.add(var, eps))))
        shift = self.builder_.emit(relax.op.subtract(beta, relax.op.multiply(mean, scale)))
        # per channel along ``axis``: (C,) -> (C, 1, ..., 1), broadcast over the axes after it
        trailing = list(range(1, rank - axis))
        if trailing:
            scale = self.builder_.emit(relax.op.expand_dims(scale, trailing))
            shift = self.builder_.emit(relax.op.expand_dims(shift, trailing))
        y = self.builder_.emit(relax.op.add(relax.op.multiply(x, scale), shift))
        return relax.Tuple([y, mean, var])

    def visit_var_binding_(self, binding):
        # ``out = bn[0]`` of a rewritten batch norm: ``out`` is ``y`` itself from here on, no alias
        # binding (FuseOps does not fuse through a tuple or an alias, and the activation after the
        # batch norm would run as its own pass over the tensor)
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and isinstance(value.tuple_value, relax.Var):
            bound = self.lookup_binding(self.visit_expr(value.tuple_value))
            field = bound.fields[value.index] if isinstance(bound, relax.Tuple) else None
            if isinstance(field, relax.Var):
                self.set_var_remap(binding.var, field)
                return
        super().visit_var_binding_(binding)


@tvm.ir.transform.module_pass(opt_level=0, name="nesc.ScaleShiftBatchNorm")
def scale_shift_batch_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The module with every inference batch norm of its Relax functions rewritten (see above)."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _ScaleShift(mod).visit_expr(func)
    return out
