"""TVM benchmark: compiled epitome models against compiled dense, torch eager and onnxruntime.

For every model (``--models a,b``; default every registered model) at ratio ``--ratio`` (4), built
with the default schedules (no tuning) for this CPU at every ``--batches`` size
(1 and 8; each compiled model is built for its batch size, as deployed):

* ``tvm_epitome``: ``nesc.compile(nesc.freeze(nesc.transform(model)))``, weights regenerated in the kernels;
* ``tvm_dense``: ``nesc.compile(model)``: the dense model through the same lowering and schedules;
* ``torch_dense``: the dense model in eager PyTorch (eval, ``no_grad``);
* ``ort_dense``: the dense model exported by ``torch.onnx.export`` and run by onnxruntime.

All four are timed in one interleaved loop (bench_core's ``interleaved``: warm-up rounds, then
``--reps`` rounds, the order rotating); each ratio is the median of the per-round ratios. Parity
(max abs error / output scale, against eager PyTorch) and deployed bytes (library + parameters
file, for the epitome and the dense build) are recorded next to the times.

    python benchmarks/bench_tvm.py                                   # every model, batches 1 and 8
    python benchmarks/bench_tvm.py --models mlp,cnn1d --batches 1,8 --reps 5

Writes ``benchmarks/results/tvm.json`` (every sample) and ``tvm.md`` (the table and the command).
Target (issue 3): epitome/dense compiled latency <= 1.1 with no tuning, and compiled epitome faster
than torch eager dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py

import numpy as np
import torch
from bench_core import RESULTS, console, interleaved, machine_facts, model_names, write_results
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import nesc
from nesc.models import get_spec

VARIANTS = ("tvm_epitome", "tvm_dense", "torch_dense", "ort_dense")
TARGET_EPITOME_OVER_DENSE = 1.1
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Settings:
    """What ``bench_core.interleaved`` reads, plus this benchmark's own choices."""

    ratio: float
    batches: tuple[int, ...]
    reps: int
    warmup: int
    measure_budget_s: float
    min_reps: int
    test_size: bool


@dataclass
class Run:
    """One model at one batch size: samples per variant (ms), parity."""

    batch: int
    ms: dict[str, list[float]] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)

    def median(self, v: str) -> float:
        return statistics.median(self.ms[v])

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.ms[a], self.ms[b]))

    def to_dict(self) -> dict:
        return asdict(self) | {"median_ms": {v: self.median(v) for v in self.ms},
                               "epitome_over_tvm_dense": self.ratio("tvm_epitome", "tvm_dense"),
                               "epitome_over_torch_dense": self.ratio("tvm_epitome", "torch_dense"),
                               "epitome_over_ort_dense": self.ratio("tvm_epitome", "ort_dense")}


@dataclass
class Result:
    model: str
    input_shape: tuple[int, ...]
    dense_params: int = 0
    bytes: dict[str, int] = field(default_factory=dict)  # deployed files and parameters, epitome and dense
    build_s: dict[str, float] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self) | {"runs": [r.to_dict() for r in self.runs]}


def onnx_session(model: nn.Module, inputs: tuple, folder: Path):
    """The dense model exported by torch.onnx.export (batch dimension dynamic) in an onnxruntime session."""
    import onnxruntime as ort

    path = folder / "dense.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, inputs, str(path), dynamic_shapes=tuple({0: batch} for _ in inputs), dynamo=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: session.run(None, dict(zip(names, xs)))[0]


def rel_error(got, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((torch.as_tensor(np.asarray(got)).double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def bench_model(name: str, s: Settings, progress: Progress) -> Result:
    spec = get_spec(name)
    shape = spec.test_input_shape if s.test_size else spec.input_shape
    result = Result(name, shape)
    torch.manual_seed(0)
    model = spec.create().eval()
    result.dense_params = sum(p.numel() for p in model.parameters())
    example = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)),)
    t0 = time.perf_counter()
    frozen = nesc.freeze(nesc.transform(model, example, ratio=s.ratio))
    result.build_s["transform_freeze"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result.bytes["dense_float32_weights"] = result.dense_params * FLOAT32_BYTES
        t0 = time.perf_counter()
        ort_run = onnx_session(model, example, folder)
        result.build_s["ort_dense"] = time.perf_counter() - t0
        for batch in s.batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            xn = x.numpy()
            # One static build per batch size, as deployed: a symbolic batch costs ~2x in the VM.
            compiled = {}
            for variant, module in (("tvm_epitome", frozen), ("tvm_dense", model)):
                t0 = time.perf_counter()
                compiled[variant] = nesc.compile(module, (x,))
                result.build_s[f"{variant}_b{batch}"] = time.perf_counter() - t0
                files = compiled[variant].export_library(folder / f"{variant}_b{batch}.so")
                result.bytes |= {f"{variant}_library": files.library_bytes, f"{variant}_params_file": files.params_bytes,
                                 f"{variant}_params": compiled[variant].param_bytes}
            with torch.no_grad():
                want_epitome, want_dense = frozen(x), model(x)
            run = Run(batch)
            run.rel_error = {"tvm_epitome": rel_error(compiled["tvm_epitome"](xn), want_epitome),
                             "tvm_dense": rel_error(compiled["tvm_dense"](xn), want_dense),
                             "ort_dense": rel_error(ort_run(xn), want_dense)}

            def torch_dense(x=x):
                with torch.no_grad():
                    model(x)

            fns = {"tvm_epitome": lambda xn=xn: compiled["tvm_epitome"](xn),
                   "tvm_dense": lambda xn=xn: compiled["tvm_dense"](xn),
                   "torch_dense": torch_dense, "ort_dense": lambda xn=xn: ort_run(xn)}
            run.ms = interleaved(fns, s, progress, f"{name} batch {batch}").ms
            result.runs.append(run)
    return result


# ----------------------------------------------------------------------------------------------- output


def markdown(facts: dict, s: Settings, results: list[Result]) -> str:
    lines = [
        "# nesc TVM benchmark", "",
        f"Command: `{facts['command']}`", "",
        f"{facts['date']}; {facts['cpu']} ({facts['cpu_count']} cores), torch {facts['torch']} "
        f"({facts['torch_threads']} threads), TVM {facts['tvm']}, onnxruntime {facts['onnxruntime']}; git {facts['git']}; "
        f"load average {facts['loadavg_start'][0]:.1f} at start, {facts['loadavg_end'][0]:.1f} at end.", "",
        f"Ratio {s.ratio:g}, default schedules (no tuning), {s.warmup} warm-up + up to {s.reps} interleaved rounds; "
        f"ratios are medians of per-round ratios. err: max abs error / output scale against eager PyTorch.", "",
        "| model | input | batch | TVM epitome ms | TVM dense ms | torch dense ms | ORT dense ms | epitome / TVM dense "
        "| epitome / torch | epitome / ORT | err epitome | deployed bytes epitome | deployed bytes dense | params bytes epitome / dense | target met? |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.model} | {'x'.join(map(str, r.input_shape))} | - | failed: {r.error.splitlines()[-1]} |")
            continue
        b = r.bytes
        epitome_bytes = b["tvm_epitome_library"] + b["tvm_epitome_params_file"]
        dense_bytes = b["tvm_dense_library"] + b["tvm_dense_params_file"]
        for run in r.runs:
            over_dense, over_torch = run.ratio("tvm_epitome", "tvm_dense"), run.ratio("tvm_epitome", "torch_dense")
            misses = [f"{over_dense:.2f} > {TARGET_EPITOME_OVER_DENSE}"] if over_dense > TARGET_EPITOME_OVER_DENSE else []
            misses += ["slower than torch"] if over_torch >= 1 else []
            lines.append(
                f"| {r.model} | {'x'.join(map(str, r.input_shape))} | {run.batch} | "
                + " | ".join(f"{run.median(v):.2f}" for v in VARIANTS)
                + f" | {over_dense:.2f}x | {over_torch:.2f}x | {run.ratio('tvm_epitome', 'ort_dense'):.2f}x"
                f" | {run.rel_error['tvm_epitome']:.1e} | {epitome_bytes:,} | {dense_bytes:,}"
                f" | {b['tvm_epitome_params']:,} / {b['tvm_dense_params']:,} | {'yes' if not misses else 'no: ' + ', '.join(misses)} |")
    lines += ["", "Deployed bytes: the `.so` plus its `.params.safetensors`; the parameters are the pools, routing "
              "maps and what stayed dense (epitome) or every weight (dense).", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated registry names (default: every registered model)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--ratio", type=float, default=4.0, help="compression ratio (default 4)")
    p.add_argument("--reps", type=int, default=7, help="timed interleaved rounds (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--measure-budget-s", type=float, default=60.0, help="cap one measurement's rounds at ~this (60)")
    p.add_argument("--min-reps", type=int, default=3, help="but time at least this many rounds (default 3)")
    p.add_argument("--test-size", action="store_true", help="use each model's reduced test_input_shape")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    p.add_argument("--name", default="tvm", help="output file stem (default tvm)")
    args = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--batches must be comma-separated integers; got {args.batches!r}")
    if min(args.reps, args.min_reps, *batches) < 1 or args.warmup < 0:
        p.error("--reps, --min-reps and batch sizes must be >= 1, --warmup >= 0")
    return args, Settings(args.ratio, batches, args.reps, args.warmup, args.measure_budget_s,
                          min(args.min_reps, args.reps), args.test_size)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime
    import tvm

    args, settings = parse_args(argv)
    torch.set_flush_denormal(True)  # see bench_core.py: untrained deep nets reach denormals
    names = model_names(args.models)
    facts = machine_facts() | {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
                               "tvm_num_threads": os.environ.get("TVM_NUM_THREADS", "TVM default")}
    results: list[Result] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("models", total=len(names))
        for name in names:
            try:
                results.append(bench_model(name, settings, progress))
            except Exception:  # noqa: BLE001  one broken model must not lose the others' numbers; reported
                spec = get_spec(name)
                results.append(Result(name, spec.test_input_shape if settings.test_size else spec.input_shape,
                                      error=traceback.format_exc()))
                console.print(f"[red]{name} failed:[/red] {results[-1].error.splitlines()[-1]}")
            progress.advance(overall)
    facts["loadavg_end"] = os.getloadavg()
    return write_results(args.out / args.name, facts, settings, results, markdown(facts, settings, results))


if __name__ == "__main__":
    sys.exit(main())
