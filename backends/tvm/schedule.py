# INTERIM: replaced by the compiler half at merge.
from __future__ import annotations

from nesc.backends.tvm.adapter import relax, s_tir, tvm


def prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    seq = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
           relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if "gpu" in target.keys:
        dl = s_tir.dlight
        seq.append(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                           dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
    with target:
        return tvm.transform.Sequential(seq)(mod)
