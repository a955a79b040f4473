"""The one place that knows TVM's Python API (pinned: apache-tvm 0.27, apache-tvm-ffi 0.1.14.post0).

TVM renames things between releases; in 0.27: target strings with flags are rejected (targets are
dicts, ``{"kind": "llvm", ...}``), ``tvm.nd`` is ``tvm.runtime.tensor``, ``tvm.tir`` is ``tvm.tirx``,
schedules and MetaSchedule live under ``tvm.s_tir``, ``tvm.contrib.cc`` is ``tvm.support.cc``,
``Var.name_hint`` is ``.name`` and ``relax.Constant`` is ``tvm.ir.Constant``. Everything else in
``nesc.backends.tvm`` imports TVM names from here, so a TVM upgrade is a change to this file.
"""

from __future__ import annotations

from nesc.errors import NescError

try:
    import tvm
    from tvm import relax, te, tirx as tir
    from tvm import s_tir
    from tvm.support import cc
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise NescError(
        "nesc's TVM backend needs Apache TVM: pip install 'nesc[tvm]' "
        f"(apache-tvm 0.27 with apache-tvm-ffi 0.1.14.post0); import failed with: {e}"
    ) from e

__all__ = ["cc", "relax", "s_tir", "te", "tir", "tvm"]


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
