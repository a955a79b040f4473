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
