"""The one place that knows TVM's Python API (pinned: apache-tvm 0.27, apache-tvm-ffi 0.1.14.post0).

TVM renames things between releases; in 0.27: target strings with flags are rejected (targets are
dicts, ``{"kind": "llvm", ...}``), ``tvm.nd`` is ``tvm.runtime.tensor``, ``tvm.tir`` is ``tvm.tirx``,
schedules and MetaSchedule live under ``tvm.s_tir``, ``tvm.contrib.cc`` is ``tvm.support.cc``,
``Var.name_hint`` is ``.name`` and ``relax.Constant`` is ``tvm.ir.Constant``. Everything else in
``nesc.backends.tvm`` imports TVM names from here, so a TVM upgrade is a change to this file. The
host LLVM target is built here too (``host_llvm``): the ``llvm`` row of ``targets.py`` and the tests
build for exactly that.
"""

from __future__ import annotations

import os

from nesc.core.errors import NescError

try:
    import tvm
    from tvm import relax, sym as arith, te, tirx as tir  # tvm.arith is tvm.sym in 0.27
    from tvm import s_tir, topi
    from tvm.support import cc
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise NescError(
        "nesc's TVM backend needs Apache TVM: pip install 'nesc[tvm]' "
        f"(apache-tvm 0.27 with apache-tvm-ffi 0.1.14.post0); import failed with: {e}"
    ) from e

__all__ = ["arith", "cc", "relax", "s_tir", "te", "tir", "topi", "tvm"]

# The torch importer (``from_exported_program``; never ``from_fx``, which miscompiles conv/pool padding
# in 0.27), its converter table, and ``detach_params``.
from tvm.relax.frontend import detach_params  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter  # noqa: E402


def var_name(var) -> str:
    """A Relax/TIR variable's name (``name_hint`` before 0.27, ``name`` since)."""
    return var.name if hasattr(var, "name") else var.name_hint


__all__ += ["ExportedProgramImporter", "detach_params", "from_exported_program", "var_name"]


def region_buffer(region):
    """The buffer a block read/write region refers to (``BufferRegion.buffer``; ``TensorRegion.source``
    in 0.27)."""
    return region.source if hasattr(region, "source") else region.buffer


__all__ += ["region_buffer"]


def relax_constants(mod) -> list:
    """Every constant tensor of the Relax functions in ``mod``, as numpy arrays. In 0.27 a tensor
    constant is a ``tvm.ir.GenericConst`` (``relax.Constant`` is gone) holding its data in ``.value``;
    scalar ``IntImm``/``FloatImm`` are constants too, but no tensors."""
    const_cls = getattr(tvm.ir, "Constant", None) or relax.Constant
    found = []

    def visit(e):
        data = getattr(e, "value", None) if isinstance(e, const_cls) else None
        if data is None and isinstance(e, const_cls):
            data = getattr(e, "data", None)
        if data is not None and hasattr(data, "numpy"):
            found.append(data.numpy())

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


__all__ += ["relax_constants"]


def var_shape(var) -> tuple:
    """A Relax variable's static shape (symbolic dims as TIR expressions): ``.ty`` in 0.27 (was
    ``.struct_info``)."""
    info = var.ty if hasattr(var, "ty") else var.struct_info
    return tuple(int(d) if hasattr(d, "value") else d for d in info.shape)


__all__ += ["var_shape"]


def reordered(func, params: list, **attrs):
    """Relax function ``func`` taking ``params`` (its own parameters, in another order), ``attrs`` set:
    the return type is ``ret_ty`` in 0.27 (was ``ret_struct_info``)."""
    ret = func.ret_ty if hasattr(func, "ret_ty") else func.ret_struct_info
    out = relax.Function(params, func.body, ret, func.is_pure, func.attrs)
    for key, value in attrs.items():
        out = out.with_attr(key, value)
    return out


def tuple_length(x) -> int | None:
    """How many fields a tuple-typed Relax variable, or a function's tuple return type, has (None for
    anything else): ``.ty`` / ``.ret_ty`` in 0.27 (were ``.struct_info`` / ``.ret_struct_info``)."""
    if isinstance(x, relax.Function):
        info = x.ret_ty if hasattr(x, "ret_ty") else x.ret_struct_info
    else:
        info = x.ty if hasattr(x, "ty") else x.struct_info
    fields = getattr(info, "fields", None)
    return len(fields) if fields is not None else None


__all__ += ["reordered", "tuple_length"]


def with_string_function(mod, name: str, text: str):
    """``mod`` plus a public Relax function ``name() -> text``: a string the compiled library carries
    (called through the VM like ``main``). ``StringImm`` is ``tvm.ir.StringImm`` in 0.27 (was
    ``relax.StringImm``); a function without ``global_symbol`` is private and may be dropped."""
    string = getattr(tvm.ir, "StringImm", None) or relax.StringImm
    mod = mod.clone()
    mod[name] = relax.Function([], string(text)).with_attr("global_symbol", name)
    return mod


__all__ += ["with_string_function"]


def host_llvm() -> dict:
    """LLVM for the CPU this process runs on, as a target dict: ``mcpu`` set, so AVX2/AVX-512 and FMA
    are used (a bare ``{"kind": "llvm"}`` compiles for baseline x86-64: SSE2, no FMA), and every core
    for parallel loops. The ``llvm`` row of ``targets.TARGETS`` builds exactly this."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


def host_target() -> "tvm.target.Target":
    """``host_llvm()`` as a ``tvm.target.Target``: what ``nesc.compile(..., target="llvm")`` builds for."""
    return tvm.target.Target(host_llvm())


__all__ += ["host_llvm", "host_target"]

# ------------------------------------------------------------------- tensor intrinsics, imported fast

import contextlib  # noqa: E402
import inspect  # noqa: E402
import linecache  # noqa: E402
import sys  # noqa: E402


def _stack_without_modules(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without its ``getmodule`` lookups: same frames, files, lines and code lines."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        line = linecache.getline(filename, lineno)
        frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name,
                                        [line] if line else None, 0 if line else None, positions=None))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule does on its first tuning context) quickly.

    Its import parses a few hundred TVMScript functions, and each ``@T.prim_func`` calls
    ``inspect.stack()``, whose ``getmodule`` scans ``sys.modules`` for every frame: with torch
    loaded (thousands of modules) that import took 10 minutes on a 2-core machine. The frames and
    code lines the parser reads are the same with the lookup left out.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with contextlib.ExitStack() as restore:
        original = inspect.stack
        inspect.stack = _stack_without_modules
        restore.callback(setattr, inspect, "stack", original)
        import tvm.s_tir.tensor_intrin  # noqa: F401
