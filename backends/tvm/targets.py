"""Where a compiled model can run: a table of named targets.

Each row says how to build for it (a TVM target in dict form: 0.27 rejects target strings with flags),
how to link the exported library (the host compiler, or a cross compiler) and whether it can run on
this machine. ``get_target(name)`` raises for an unknown name and lists the valid ones.

| name    | builds                                   | links with                 | runs here when      |
|---------|------------------------------------------|----------------------------|---------------------|
| llvm    | host CPU: ``adapter.host_llvm()``        | the host C compiler        | always              |
| aarch64 | 64-bit ARM Linux with NEON               | aarch64-linux-gnu-gcc      | never (cross build) |
| cuda    | NVIDIA GPU kernels + LLVM host code      | the host C compiler        | a CUDA GPU is found |

The aarch64 cross compiler is Debian's ``gcc-aarch64-linux-gnu``. For CUDA, TVM emits CUDA C and
compiles it with NVRTC or nvcc when one is installed; without a GPU the kernels cannot be run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from nesc.backends.tvm.adapter import cc, host_llvm, tvm
from nesc.core.errors import NescError
from nesc.core.registry import Registry

# Used when no GPU can be asked for its compute capability: Ampere (A100), which every later GPU runs.
DEFAULT_CUDA_ARCH = "sm_80"
AARCH64_GCC = "aarch64-linux-gnu-gcc"


class TargetError(NescError, ValueError):
    """An unknown target name, or a target this machine cannot build for or run."""


@dataclass(frozen=True)
class TargetSpec:
    """One row of the target table.

    name: what users pass (``nesc.compile(..., target="aarch64")``, ``nesc compile --target``).
    describe: one line for tables and errors.
    make: builds the TVM target dict (called late: the host CPU and the GPU are detected then).
    device: the TVM device kind the compiled model runs on (``cpu`` or ``cuda``).
    cross_compiler: the C compiler that links the exported library; None means the host's.
    """

    name: str
    describe: str
    make: Callable[[], dict]
    device: str
    cross_compiler: str | None = None

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.make())

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    def fcompile(self) -> Callable | None:
        """The ``fcompile`` for ``export_library``: a cross compiler, or None for the host compiler."""
        if self.cross_compiler is None:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise TargetError(
                f"target {self.name!r} links with {self.cross_compiler}, which is not on PATH; install it "
                f"(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu) and try again"
            )
        return cc.cross_compiler(self.cross_compiler)

    def runs_here(self) -> bool:
        if self.cross_compiler is not None:
            return False
        return self.device == "cpu" or tvm.device(self.device, 0).exist

    def tvm_device(self) -> tvm.runtime.Device:
        return tvm.device(self.device, 0)


def aarch64_llvm() -> dict:
    # Generic ARMv8-A with NEON (every 64-bit ARM Linux board); MetaSchedule wants a core count.
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}


def cuda() -> dict:
    device = tvm.cuda(0)
    arch = f"sm_{device.compute_version.replace('.', '')}" if device.exist else DEFAULT_CUDA_ARCH
    return {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}}


TARGETS: Registry[TargetSpec] = Registry("target")
for _spec in (
    TargetSpec("llvm", "this machine's CPU (LLVM)", host_llvm, "cpu"),
    TargetSpec("aarch64", "64-bit ARM Linux with NEON, cross-compiled", aarch64_llvm, "cpu", AARCH64_GCC),
    TargetSpec("cuda", f"NVIDIA GPU (CUDA; {DEFAULT_CUDA_ARCH} when no GPU is visible)", cuda, "cuda"),
):
    TARGETS.add(_spec.name, _spec)


def get_target(target: str | TargetSpec) -> TargetSpec:
    """The table row for ``target`` (a name, or a ``TargetSpec`` of your own, returned as is)."""
    if isinstance(target, TargetSpec):
        return target
    if not isinstance(target, str) or target not in TARGETS:
        rows = "; ".join(f"{name} ({TARGETS.get(name).describe})" for name in TARGETS.names())
        raise TargetError(f"unknown target {target!r}; valid targets: {rows}")
    return TARGETS.get(target)
