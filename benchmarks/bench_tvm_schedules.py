"""Latency of the default TVM schedules (no tuning): compiled epitome vs compiled dense vs torch eager.

For each case (model, batch): the frozen epitome model (ratio 4) and the dense model are lowered with
``nesc.backends.tvm.lower.lower``, prepared with ``schedule.prepare`` and built with ``tvm.compile`` for
this CPU (``adapter.host_target()``); the three are timed in interleaved rounds in one process, and
every compiled output is checked against torch first (max abs error <= 1e-4 x output scale).

    TVM_NUM_THREADS=1 python benchmarks/bench_tvm_schedules.py            # the committed results
    python benchmarks/bench_tvm_schedules.py --cases resnet18_cifar:1 --dynamic

Threads are pinned to one (``--threads``) because this machine's 2 cores are shared: medians at one
thread are repeatable, at two they are not. Results: benchmarks/results/tvm_schedules.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import nesc
from nesc.backends.tvm.adapter import host_target, relax, tvm
from nesc.backends.tvm.lower import lower
from nesc.backends.tvm.schedule import prepare
from nesc.models import get_spec

RESULTS = Path(__file__).parent / "results"
DEFAULT_CASES = ["mlp:1", "mlp:8", "cnn1d:1", "cnn1d:8", "resnet18_cifar:1", "resnet18_cifar:8", "vit_tiny:1",
                 "vit_tiny:8", "mobilenetv2:1"]


def compiled(model, inputs, target, dynamic: bool):
    low = lower(model, inputs, dynamic_batch=dynamic)
    vm = relax.VirtualMachine(tvm.compile(prepare(low.mod, target), target), tvm.cpu())
    args = [tvm.runtime.tensor(t.numpy()) for t in inputs] + [tvm.runtime.tensor(a) for a in low.params.values()]
    out = vm["main"](*args)
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    with torch.no_grad():
        want = model(*inputs).numpy()
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    if err > 1e-4:
        raise SystemExit(f"parity failed: relative max error {err:.3g}")
    return (lambda: vm["main"](*args)), err, sum(a.nbytes for a in low.params.values())


def run_case(name: str, batch: int, args) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.create().eval()
    inputs = spec.example_inputs(batch)
    frozen = nesc.freeze(nesc.transform(model, inputs, ratio=4, init="random"))
    target = host_target()
    t0 = time.perf_counter()
    epi, epi_err, epi_bytes = compiled(frozen, inputs, target, args.dynamic)
    dense, dense_err, dense_bytes = compiled(model, inputs, target, args.dynamic)
    build_s = time.perf_counter() - t0

    def eager():
        with torch.no_grad():
            model(*inputs)

    fns = {"epitome": epi, "dense": dense, "torch": eager}
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(args.rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            samples[k].append((time.perf_counter() - t) * 1e3)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    return {
        "model": name, "batch": batch, "input": list(spec.input_shape), "dynamic_batch": args.dynamic,
        "ms": med, "min_ms": {k: float(np.min(v)) for k, v in samples.items()}, "samples_ms": samples,
        "epitome_over_dense": med["epitome"] / med["dense"], "epitome_over_torch": med["epitome"] / med["torch"],
        "dense_over_torch": med["dense"] / med["torch"], "param_bytes": {"epitome": epi_bytes, "dense": dense_bytes},
        "rel_err": {"epitome": epi_err, "dense": dense_err}, "build_s": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="model:batch ...")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dynamic", action="store_true", help="symbolic batch (default: the batch is static)")
    parser.add_argument("--out", default="tvm_schedules")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # read when TVM's thread pool starts
    rows = []
    for case in args.cases:
        name, batch = case.split(":")
        rows.append(run_case(name, int(batch), args))
        r = rows[-1]
        print(f"{name} b{batch}: epitome {r['ms']['epitome']:.2f} ms, dense {r['ms']['dense']:.2f} ms, "
              f"torch {r['ms']['torch']:.2f} ms", flush=True)
    command = "TVM_NUM_THREADS=%s python benchmarks/bench_tvm_schedules.py %s" % (
        os.environ["TVM_NUM_THREADS"], " ".join(sys.argv[1:]))
    meta = {"command": command, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "tvm": tvm.__version__,
            "target": str(host_target())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Default TVM schedules: compiled epitome vs compiled dense vs torch eager", "",
        f"`{command}` — {meta['cpus']} shared cores, {args.threads} thread(s), target `{meta['target']}`, "
        f"torch {meta['torch']}, tvm {meta['tvm']}; median of {args.rounds} interleaved rounds (ms); "
        f"{'symbolic' if args.dynamic else 'static'} batch; epitome at ratio 4; no tuning. "
        "Every compiled output matched torch (max abs error <= 1e-4 x output scale) before timing.", "",
        "| model | batch | epitome ms | dense ms | torch eager ms | epitome / dense | epitome / torch | dense / torch | param bytes epitome / dense |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['ms']['epitome']:.2f} | {r['ms']['dense']:.2f} | {r['ms']['torch']:.2f} | "
            f"{r['epitome_over_dense']:.2f} | {r['epitome_over_torch']:.2f} | {r['dense_over_torch']:.2f} | "
            f"{r['param_bytes']['epitome']:,} / {r['param_bytes']['dense']:,} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
