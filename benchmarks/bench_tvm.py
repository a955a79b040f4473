"""TVM benchmark: compiled epitome models against compiled dense, torch eager and onnxruntime.

For every model (``--models a,b``; default every registered model) at ratio ``--ratio`` (4), built
with the default schedules (no tuning) for this CPU at every ``--batches`` size
(1 and 8; each compiled model is built for its batch size, as deployed):

* ``tvm_once``: ``nesc.compile(nesc.freeze(nesc.transform(model)), regenerate="once")``: the weights
  rebuilt from the pools once, when the model loads (its first call here), then the dense graph;
* ``tvm_per_call``: the same with ``regenerate="per_call"``: every weight regenerated in every call;
* ``tvm_dense``: ``nesc.compile(model)``: the dense model through the same lowering and schedules;
* ``torch_dense``: the dense model in eager PyTorch (eval, ``no_grad``);
* ``ort_dense``: the dense model exported by ``torch.onnx.export`` and run by onnxruntime.

All five run on ``--threads`` threads (default 1: TVM_NUM_THREADS, torch's intra-op threads and
onnxruntime's, set alike, so that no ratio compares two thread counts). All five are timed in one interleaved loop (bench_core's ``interleaved``: warm-up rounds, then
``--reps`` rounds, the order rotating; half of them with the TVM variants reversed, each round
opened by a one-op TVM call, see ``timed``); each ratio is the median of the per-round ratios. Parity
(max abs error / output scale, against eager PyTorch) and deployed bytes (library + parameters
file, for the epitome and the dense build) are recorded next to the times. Memory: each TVM build is
exported and run by the torch-free runtime (``runtime.py``, torch kept out) in a fresh process,
``RSS_CALLS`` calls; its peak resident set (``VmHWM``, Linux) and the part of it above the process's
resident set before the model was loaded (tvm and numpy imported) are recorded.

    python benchmarks/bench_tvm.py                                   # every model, batches 1 and 8
    python benchmarks/bench_tvm.py --models mlp,cnn1d --batches 1,8 --reps 5

Writes ``benchmarks/results/tvm.json`` (every sample) and ``tvm.md`` (the table and the command).
Targets (issue 14): ``once`` / TVM dense <= 1.0 with no tuning, and ``per_call``'s peak memory
below dense's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py

import numpy as np
import torch
from bench_core import (RESULTS, input_shape, interleaved, machine_facts, model_names, run_models,
                        write_results)
from rich.progress import Progress
from torch import nn

import nesc
from nesc.backends.tvm import runtime
from nesc.models import get_spec

VARIANTS = ("tvm_once", "tvm_per_call", "tvm_dense", "torch_dense", "ort_dense")
TVM_VARIANTS = ("tvm_once", "tvm_per_call", "tvm_dense")  # exported, and run torch-free for their memory
TARGET_ONCE_OVER_DENSE = 1.0
TARGET_ONCE_OVER_ORT = 1.5  # and at most 1.5x what onnxruntime runs the dense model in
FLOAT32_BYTES = 4
MB = 2**20
RSS_CALLS = 5
# A fresh interpreter without torch (as on a device) loads an export with runtime.py, calls it and
# prints its resident set: before loading (tvm, numpy imported), after, and the peak: Linux's VmHWM of
# this process (ru_maxrss would not do: it keeps the high-water mark of the forked benchmark process,
# torch and all, across exec).
RSS_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("no torch on this device", name=name)
    sys.meta_path.insert(0, NoTorch())
    runtime_file, library, batch, calls = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("deploy_runtime", runtime_file)
    rt = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    import numpy, psutil, tvm
    from tvm import relax
    process = psutil.Process()
    before = process.memory_info().rss
    model = rt.load(library)
    loaded = process.memory_info().rss
    inputs = [s.example(int(batch)) for s in model.input_specs]
    for _ in range(int(calls)):
        model(*inputs)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"before": before, "loaded": loaded, "steady": process.memory_info().rss, "peak": peak}))
""")


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
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # TVM variant -> RSS_SCRIPT's bytes

    def median(self, v: str) -> float:
        return statistics.median(self.ms[v])

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.ms[a], self.ms[b]))

    def to_dict(self) -> dict:
        return asdict(self) | {"median_ms": {v: self.median(v) for v in self.ms},
                               "once_over_tvm_dense": self.ratio("tvm_once", "tvm_dense"),
                               "per_call_over_tvm_dense": self.ratio("tvm_per_call", "tvm_dense"),
                               "once_over_per_call": self.ratio("tvm_once", "tvm_per_call"),
                               "once_over_torch_dense": self.ratio("tvm_once", "torch_dense"),
                               "once_over_ort_dense": self.ratio("tvm_once", "ort_dense")}

    def model_mb(self, v: str, at: str = "peak") -> float:
        """Resident memory (``at``: peak, loaded or steady) above what the runtime process held before
        loading the model, MB."""
        return (self.rss[v][at] - self.rss[v]["before"]) / MB


@dataclass
class Result:
    model: str
    input_shape: tuple[int, ...]
    dense_params: int = 0
    bytes: dict[str, int] = field(default_factory=dict)  # deployed files and parameters, per TVM variant
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
    options.intra_op_num_threads = torch.get_num_threads()  # main sets it to --threads, as TVM's and torch's
    options.inter_op_num_threads = 1
    # Its threads would spin after each run and slow whatever is timed next (the rotation keeps the
    # order, so always the same variant: 20% on the MLP), as torch's would without OMP_WAIT_POLICY.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: session.run(None, dict(zip(names, xs)))[0]


def rel_error(got, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((torch.as_tensor(np.asarray(got)).double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def timed(tvm_fns: dict, others: dict, s: Settings, progress: Progress, label: str) -> dict[str, list[float]]:
    """``bench_core.interleaved`` over the TVM variants and the others, half the rounds with the TVM
    variants in reverse order; samples of both halves, round by round.

    The first TVM call after torch or onnxruntime pays for waking TVM's thread pool (0.1-0.15 ms, a
    third of cnn1d's call), and the rotation keeps the cyclic order, so it would always be the same
    variant's: a one-op TVM call (``_WAKE``, timed but not reported) runs first, as in a steady
    stream of calls, and reversing the TVM variants half the time evens out what is left."""
    wake = _wake()
    half = replace(s, reps=max(1, s.reps // 2), min_reps=max(1, s.min_reps // 2), measure_budget_s=s.measure_budget_s / 2)
    samples = {v: [] for v in [*tvm_fns, *others]}
    for order in (list(tvm_fns), list(reversed(tvm_fns))):
        fns = {_WAKE: wake} | {v: tvm_fns[v] for v in order} | others
        for v, ms in interleaved(fns, half, progress, label).ms.items():
            samples.get(v, []).extend(ms)
    return samples


_WAKE = "tvm_wake"


@functools.cache
def _wake():
    """A one-op compiled model (parallel over 4096 elements) and its input, called to wake TVM's threads."""
    x = torch.zeros(1, 4096)
    compiled = nesc.compile(nn.ReLU(), (x,))
    xn = x.numpy()
    return lambda: compiled(xn)


def runtime_rss(library: Path, batch: int) -> dict[str, int]:
    """``RSS_SCRIPT``'s resident-set bytes for ``library`` (exported by ``export_library``)."""
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, runtime.__file__, str(library), str(batch), str(RSS_CALLS)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the torch-free runtime failed on {library.name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
            builds = {"tvm_once": (frozen, "once"), "tvm_per_call": (frozen, "per_call"), "tvm_dense": (model, "per_call")}
            compiled, run = {}, Run(batch)
            for variant, (module, regenerate) in builds.items():
                t0 = time.perf_counter()
                compiled[variant] = nesc.compile(module, (x,), regenerate=regenerate)
                result.build_s[f"{variant}_b{batch}"] = time.perf_counter() - t0
                files = compiled[variant].export_library(folder / f"{variant}_b{batch}.so")
                result.bytes |= {f"{variant}_library": files.library_bytes, f"{variant}_params_file": files.params_bytes,
                                 f"{variant}_params": compiled[variant].param_bytes}
                run.rss[variant] = runtime_rss(files.library, batch)
            with torch.no_grad():
                want_epitome, want_dense = frozen(x), model(x)
            run.rel_error = {v: rel_error(compiled[v](xn), want_epitome) for v in ("tvm_once", "tvm_per_call")}
            run.rel_error |= {"tvm_dense": rel_error(compiled["tvm_dense"](xn), want_dense),
                              "ort_dense": rel_error(ort_run(xn), want_dense)}

            def torch_dense(x=x):
                with torch.no_grad():
                    model(x)

            tvm_fns = {v: (lambda xn=xn, c=compiled[v]: c(xn)) for v in TVM_VARIANTS}
            others = {"torch_dense": torch_dense, "ort_dense": lambda xn=xn: ort_run(xn)}
            run.ms = timed(tvm_fns, others, s, progress, f"{name} batch {batch}")
            result.runs.append(run)
    return result


# ----------------------------------------------------------------------------------------------- output


def markdown(facts: dict, s: Settings, results: list[Result]) -> str:
    lines = [
        "# nesc TVM benchmark", "",
        f"Command: `{facts['command']}`", "",
        f"{facts['date']}; {facts['cpu']} ({facts['cpu_count']} cores), torch {facts['torch']} "
        f"({facts['torch_threads']} threads), TVM {facts['tvm']} (TVM_NUM_THREADS: {facts['tvm_num_threads']}), "
        f"onnxruntime {facts['onnxruntime']}; git {facts['git']}; "
        f"load average {facts['loadavg_start'][0]:.1f} at start, {facts['loadavg_end'][0]:.1f} at end.", "",
        f"Ratio {s.ratio:g}, default schedules (no tuning), {s.warmup} warm-up + up to {s.reps} interleaved rounds; "
        f"ratios are medians of per-round ratios. err: max abs error / output scale against eager PyTorch. "
        f"once: weights regenerated when the model loads; per_call: in every call.", "",
        "## Latency", "",
        "| model | input | batch | once ms | per_call ms | TVM dense ms | torch dense ms | ORT dense ms "
        "| once / TVM dense | per_call / TVM dense | once / per_call | once / torch | once / ORT | err once "
        "| err per_call | target met? |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    memory = [
        "## Memory and size", "",
        f"Resident set of the torch-free runtime (`runtime.py` in a fresh process without torch: load, {RSS_CALLS} "
        f"calls) above what the process held before loading the model (tvm and numpy imported: the baseline "
        f"column): its peak (VmHWM; loading maps the parameters file while it is read, which counts) and after "
        f"the calls (steady). Deployed bytes: the `.so` plus its `.params.safetensors`; the parameters are "
        f"the pools, routing maps and what stayed dense (epitome, the same in both modes) or every weight (dense).", "",
        "| model | batch | baseline MB | once MB peak / steady | per_call MB peak / steady | dense MB peak / steady "
        "| per_call peak below dense? | deployed bytes once | deployed bytes per_call | deployed bytes dense "
        "| params bytes epitome / dense |",
        "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for r in results:
        shape = "x".join(map(str, r.input_shape))
        if r.error:
            lines.append(f"| {r.model} | {shape} | - | failed: {r.error.splitlines()[-1]} |")
            continue
        b = r.bytes
        deployed = {v: b[f"{v}_library"] + b[f"{v}_params_file"] for v in TVM_VARIANTS}
        for run in r.runs:
            once = run.ratio("tvm_once", "tvm_dense")
            lean = run.rss["tvm_per_call"]["peak"] < run.rss["tvm_dense"]["peak"]
            # judged as shown (two decimals): 1.004x is dense speed within what the rounds resolve
            misses = [f"once {once:.2f} > {TARGET_ONCE_OVER_DENSE:g}"] if round(once, 2) > TARGET_ONCE_OVER_DENSE else []
            over_ort = run.ratio("tvm_once", "ort_dense")
            misses += [f"once / ORT {over_ort:.2f} > {TARGET_ONCE_OVER_ORT:g}"] if round(over_ort, 2) > TARGET_ONCE_OVER_ORT else []
            misses += [] if lean else ["per_call peak RSS not below dense"]
            lines.append(
                f"| {r.model} | {shape} | {run.batch} | " + " | ".join(f"{run.median(v):.2f}" for v in VARIANTS)
                + f" | {once:.2f}x | {run.ratio('tvm_per_call', 'tvm_dense'):.2f}x"
                f" | {run.ratio('tvm_once', 'tvm_per_call'):.2f}x | {run.ratio('tvm_once', 'torch_dense'):.2f}x"
                f" | {run.ratio('tvm_once', 'ort_dense'):.2f}x | {run.rel_error['tvm_once']:.1e}"
                f" | {run.rel_error['tvm_per_call']:.1e} | {'yes' if not misses else 'no: ' + ', '.join(misses)} |")
            rss = " | ".join(f"{run.model_mb(v):.1f} / {run.model_mb(v, 'steady'):.1f}" for v in TVM_VARIANTS)
            memory.append(
                f"| {r.model} | {run.batch} | {run.rss['tvm_dense']['before'] / MB:.0f} | {rss} | {'yes' if lean else 'no'} | "
                + " | ".join(f"{deployed[v]:,}" for v in TVM_VARIANTS)
                + f" | {b['tvm_once_params']:,} / {b['tvm_dense_params']:,} |")
    return "\n".join(lines + [""] + memory + [""])


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
    p.add_argument("--threads", type=int, default=1, help="threads of TVM, torch and onnxruntime alike (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    p.add_argument("--name", default="tvm", help="output file stem (default tvm)")
    args = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--batches must be comma-separated integers; got {args.batches!r}")
    if min(args.reps, args.min_reps, args.threads, *batches) < 1 or args.warmup < 0:
        p.error("--reps, --min-reps, --threads and batch sizes must be >= 1, --warmup >= 0")
    return args, Settings(args.ratio, batches, args.reps, args.warmup, args.measure_budget_s,
                          min(args.min_reps, args.reps), args.test_size)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime
    import tvm

    args, settings = parse_args(argv)
    # TVM sizes its thread pool from TVM_NUM_THREADS when its runtime first starts one (the first
    # parallel call, below), and the runtime_rss subprocesses inherit it.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # see bench_core.py: untrained deep nets reach denormals
    names = model_names(args.models)
    facts = machine_facts() | {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
                               "tvm_num_threads": os.environ["TVM_NUM_THREADS"]}
    results = run_models(names, lambda name, progress: bench_model(name, settings, progress),
                         lambda name, error: Result(name, input_shape(name, settings.test_size), error=error))
    facts["loadavg_end"] = os.getloadavg()
    return write_results(args.out / args.name, facts, settings, results, markdown(facts, settings, results))


if __name__ == "__main__":
    sys.exit(main())
