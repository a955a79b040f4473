"""Every private torch API nesc uses, in one place (as ``backends/tvm/adapter.py`` is for TVM).

A new torch release that moves one of these breaks this file only. Each entry says which public API
would replace it, so the day torch offers one, the change is here. Nothing outside this module may
import ``torch._*``, ``torch.utils._pytree``, ``torch.onnx._internal`` or read a private attribute of
a torch object (checked by ``tests/nesc/core/test_compat.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json

import torch
import torch.utils._pytree as _pytree  # public replacement: none yet (torch.utils.pytree is planned)
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo  # public: none; Graph.set_codegen takes any CodeGen

# --------------------------------------------------------------------------------------- tensors


def version_counter(t: torch.Tensor) -> int:
    """How many in-place writes ``t`` has seen (what autograd checks saved tensors with). Public
    replacement: none (``Tensor._version``)."""
    return t._version


# ------------------------------------------------------------------------------------------- ops

# Public replacement: none; ``torch.ops.<ns>.<op>.<overload>`` objects are of this type.
OpOverload = torch._ops.OpOverload
# Public replacement: none (``torch.ops.higher_order.*`` objects are of this type).
HigherOrderOperator = torch._ops.HigherOrderOperator


def is_op_overload(target) -> bool:
    return isinstance(target, OpOverload)


def op_overload_name(op) -> tuple[str, str, str]:
    """(namespace, op name, overload name) of an OpOverload: ``aten::conv2d.default`` ->
    ("aten", "conv2d", "default"). Public: ``op.namespace`` and ``op.name()`` give the first two;
    the overload name has no public accessor (``op._overloadname``)."""
    return op.namespace, op._opname, op._overloadname


def has_composite_kernel(op) -> bool:
    """The op decomposes itself (``CompositeImplicitAutograd``). Public replacement: none
    (``torch._C.DispatchKey`` is the only spelling of dispatch keys)."""
    return op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)


def quantized_decomposed_ops():
    """``torch.ops.quantized_decomposed`` with its ops registered (``quantize_per_channel``,
    ``dequantize_per_channel``: the ops torch.export, torchao and torchlib's ONNX translation, as
    ``DequantizeLinear``, share). Public replacement: none; importing ``torch.ao.quantization.quantize_pt2e``
    registers them too, but imports far more."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


# ---------------------------------------------------------------------------------------- pytree

def treespec_dumps(spec) -> str:
    """Public replacement: ``torch.utils.pytree.treespec_dumps`` once torch exposes ``torch.utils.pytree``."""
    return _pytree.treespec_dumps(spec)


def treespec_loads(text: str):
    """Public replacement: ``torch.utils.pytree.treespec_loads``."""
    return _pytree.treespec_loads(text)


def treespec_node(spec) -> tuple[str | None, str | None, list]:
    """One node of a TreeSpec as ``treespec_dumps`` writes it: (serialized type name, context as JSON
    text, child specs); a leaf is (None, None, []). A namedtuple class registered without a serialized
    name is written under ``module.qualname`` (the name a loader may know it by) instead of failing.
    Raises TypeError for a type pytree cannot serialise. Public replacement: none (``_treespec_to_json``)."""
    if spec.is_leaf():
        return None, None, []
    entry = _pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
    if entry is None or entry.serialized_type_name == _pytree.NO_SERIALIZED_TYPE_NAME_FOUND:
        raise TypeError(f"{spec.type} is registered with pytree without a serialized_type_name")
    if entry.serialized_type_name == "collections.namedtuple" and spec.context not in _pytree.SUPPORTED_SERIALIZED_TYPES:
        context = json.dumps(f"{spec.context.__module__}.{spec.context.__qualname__}")
    elif entry.to_dumpable_context is None:
        context = json.dumps(spec.context)
    else:
        context = entry.to_dumpable_context(spec.context)
    return entry.serialized_type_name, context, list(spec.children())


def pytree_type_registered(serialized_name: str) -> bool:
    """A type is registered with pytree under ``serialized_name`` in this process (its library was
    imported). Looks the name up only: imports nothing. Public replacement: none."""
    return serialized_name in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and serialized_name != _pytree.NO_SERIALIZED_TYPE_NAME_FOUND


# ---------------------------------------------------------------------------------- fx codegen

def graph_codegen(graph: fx.Graph):
    """The graph's code generator. Public: ``Graph.set_codegen`` writes it; reading has no public
    accessor (``graph._codegen``)."""
    return graph._codegen


def pytree_codegen_info(graph: fx.Graph):
    """(orig_args, in_spec, out_spec) of a graph whose forward takes/returns pytrees (what
    ``torch.export``'s ``.module()`` produces), or None for a flat signature. Public replacement: none
    (``torch.fx.graph._PyTreeCodeGen``)."""
    codegen = graph_codegen(graph)
    if not isinstance(codegen, _PyTreeCodeGen):
        return None
    info = codegen.pytree_info
    return list(info.orig_args), info.in_spec, info.out_spec


def make_pytree_codegen(orig_args: list[str], in_spec, out_spec) -> fx.graph.CodeGen:
    """The code generator for a pytree signature, for ``Graph.set_codegen``. Public replacement: none."""
    return _PyTreeCodeGen(_PyTreeInfo(orig_args, in_spec, out_spec))


# -------------------------------------------------------------------------------- nn.Module facts

def is_batch_norm(mod: nn.Module) -> bool:
    """Any batch norm (1d/2d/3d, lazy, sync). Public replacement: none
    (``torch.nn.modules.batchnorm._BatchNorm`` is their common base)."""
    return isinstance(mod, nn.modules.batchnorm._BatchNorm)


def conv_padding_for_pad(mod: nn.Module) -> list[int]:
    """The ``F.pad`` widths an ``nn.ConvNd`` with a non-zero ``padding_mode`` applies before convolving.
    Public replacement: none (``mod._reversed_padding_repeated_twice``, which also covers 'same')."""
    return list(mod._reversed_padding_repeated_twice)


# ---------------------------------------------------------------------------------------- export

def size_oblivious_export():
    """The setting the ONNX exporter decomposes under (``backed_size_oblivious=True``), so that a
    check decomposes the same way. Public replacement: none (``torch.fx.experimental._config``)."""
    config = getattr(torch.fx.experimental, "_config", None)
    if config is None:  # pragma: no cover - a torch without the flag decomposes without it
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


@functools.cache
def onnx_exporter_tables(opset: int):
    """torch.onnx's op registry for ``opset`` and the decompositions its exporter applies before
    translating (built once: the registry takes seconds). Public replacement: none; these are the
    tables ``torch.onnx.export(dynamo=True)`` dispatches on, so checking against them lists exactly
    the ops it would fail on."""
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset)
    implemented = set(_decomp.get_onnx_implemented_overloads(registry))
    return registry, _decomp.create_onnx_friendly_decomposition_table(implemented)


# ----------------------------------------------------------------------------------- safetensors

def safetensors_dtypes() -> frozenset:
    """The torch dtypes safetensors can store. Public replacement: none (``safetensors.torch._TYPES``)."""
    from safetensors.torch import _TYPES

    return frozenset(_TYPES.values())


def tree_leaves(tree) -> list:
    """The leaves of a pytree (nested tuples, lists, dicts of tensors), in flattening order. Public
    replacement: ``torch.utils.pytree.tree_leaves`` once torch exposes ``torch.utils.pytree``."""
    return _pytree.tree_leaves(tree)


def mutated_arguments(op) -> list[str]:
    """Names of the arguments an op overload writes to (``Tensor(a!)`` in its schema): ``relu_`` ->
    ["self"], ``add.out`` -> ["out"]. Public replacement: none (``op._schema``)."""
    return [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def argument_names(op) -> list[str]:
    """The op overload's argument names in schema order (positional ones first). Public: none."""
    return [a.name for a in op._schema.arguments]


def returns_alias(op) -> bool:
    """The op's output may share memory with one of its inputs (``view``, ``contiguous``, ``to``,
    ``split``, in-place ops: ``Tensor(a)`` in the returns of its schema). Public replacement: none."""
    return any(r.alias_info is not None for r in op._schema.returns)


# --------------------------------------------------------------------------- module casts

def keep_precision_on_cast(*names: str):
    """Class decorator for an ``nn.Module`` whose tensors ``names`` (parameters or buffers) are
    positions, not weights: they follow every move (``.to(device)``, ``.cuda()``, ``.cpu()``) and every
    cast to float32 or wider (``.double()``), but a cast to a narrower float (``.to(torch.bfloat16)``,
    ``.half()``), which would quantise them, leaves them in their dtype. Their gradients likewise.
    Public replacement: none; every move and cast of a module goes through ``nn.Module._apply(fn)``,
    which this overrides, and torch has no public per-tensor dtype policy for modules."""

    def decorate(cls):
        def _apply(self, fn, recurse=True):
            kept = [t for t in (getattr(self, n, None) for n in names) if t is not None]
            ids = {id(t) for t in kept} | {id(t.grad) for t in kept if t.grad is not None}

            def move_only(t):
                new = fn(t)
                if (id(t) in ids and isinstance(new, torch.Tensor) and new.dtype != t.dtype
                        and new.is_floating_point() and torch.finfo(new.dtype).bits < 32):
                    return t.detach().to(new.device, copy=True)  # fn's device; our dtype and values
                return new

            return super(cls, self)._apply(move_only, recurse)

        cls._apply = _apply
        return cls

    return decorate


def preload_lazy_modules() -> None:
    """Import what torch imports lazily on the paths a load may take (fake tensors, their dispatch-mode
    handling), so that loading a file imports nothing new. Public replacement: none (``torch._subclasses``)."""
    import torch._subclasses.fake_tensor  # noqa: F401
    import torch._subclasses.functional_tensor  # noqa: F401
    import torch._subclasses.schema_check_mode  # noqa: F401


def fake_tensor_mode():
    """A ``FakeTensorMode`` in which tensors have shapes and dtypes but no storage, and real tensors
    (a module's parameters) may be mixed in. Public replacement: none (``torch._subclasses``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)
