"""ONNX benchmark: file size, onnxruntime latency and memory of the compressed export next to the dense model's.

For every model (``nesc.models.list_models()`` or ``--models a,b``) at ``--ratio`` (pools drawn at
random: sizes and timings do not depend on the values):

* ``nesc.export_onnx(frozen, inputs, path, dense=model)`` at the model's ``test_input_shape``, batch 2
  (the batch stays symbolic): file bytes and stored tensor bytes, compressed and dense; export seconds
  (one run, both exports);
* onnxruntime (CPU, ``--threads``) against the frozen model in eager PyTorch at batch 3: max abs error
  relative to the output scale;
* onnxruntime forward latency at batch ``--batch`` (``--threads``), interleaved rounds of the
  compressed file in a default session (``ort_session(regenerate="once")``: onnxruntime folds every
  regenerated weight into a dense initializer when it creates the session), the dense file, and
  (unless ``--no-per-call``) the compressed file with constant folding disabled
  (``regenerate="per_call"``: every run regenerates every weight); medians of ``--reps`` per-round
  ratios to dense;
* whether the folded session runs the dense model's graph: the graph onnxruntime runs after its
  optimizations (``optimized_model_filepath``) has the same ops as the dense file's, and no pool left;
* peak resident memory (``VmHWM``) of a fresh process that creates one session and runs it once at
  batch ``--batch``, for each of the three, over the same process before the session (onnxruntime and
  numpy imported), and the session's creation time (folding happens there).

    python benchmarks/bench_onnx.py                       # every model, one thread (2-core CPU: ~4 min)
    python benchmarks/bench_onnx.py --models mlp,cnn1d

Writes ``benchmarks/results/onnx.json`` (every sample) and ``onnx.md`` (the table).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py: no spin-wait stalls on a shared CPU

import numpy as np
import onnx
import onnxruntime as ort
import torch
from nesc.backends.onnx import export_dense_onnx, ort_session
from nesc.models import get_spec, list_models

import nesc

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(list_models()))
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-per-call", dest="per_call", action="store_false",
                        help="skip the compressed file with folding disabled (slow: it regenerates every run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench(name, args) for name in args.models.split(",")]
    command = "python benchmarks/bench_onnx.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    facts = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    (args.out / "onnx.md").write_text(markdown(facts, rows, args))
    print(markdown(facts, rows, args))
    return 0


def bench(name: str, args) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    dense = spec.create().eval()
    inputs = spec.example_inputs(2, test=True)
    frozen = nesc.freeze(nesc.transform(dense, inputs, ratio=args.ratio, init="random"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = nesc.export_onnx(frozen, inputs, Path(tmp) / f"{name}.onnx", dense=dense)
        seconds = time.perf_counter() - start
        dense_path = Path(tmp) / f"{name}_dense.onnx"
        export_dense_onnx(dense, inputs, dense_path)  # a file to time; its sizes are in the report
        x = spec.example_inputs(3, test=True, seed=1)[0]
        sessions = {"once": ort_session(report.path, threads=args.threads, optimized_model_path=Path(tmp) / "once.opt"),
                    "dense": ort_session(dense_path, threads=args.threads, optimized_model_path=Path(tmp) / "dense.opt")}
        if args.per_call:
            sessions["per_call"] = ort_session(report.path, regenerate="per_call", threads=args.threads)
        with torch.no_grad():
            want = frozen(x).numpy()
        rel_err = {mode: float(np.abs(_run(s, x.numpy()) - want).max() / np.abs(want).max())
                   for mode, s in sessions.items() if mode != "dense"}
        folded = _graph_ops(Path(tmp) / "once.opt")
        same_graph = folded == _graph_ops(Path(tmp) / "dense.opt") and not _pools_left(Path(tmp) / "once.opt")
        batch = spec.example_inputs(args.batch, test=True)[0].numpy()
        timings = {mode: _interleaved(sessions[mode], sessions["dense"], batch, args.reps)
                   for mode in sessions if mode != "dense"}
        latency = {"ms": {"dense": timings["once"]["dense_ms"]} | {m: t["ms"] for m, t in timings.items()},
                   "ratio": {m: t["ratio"] for m, t in timings.items()},
                   "samples": {m: {"runs_per_sample": t["runs_per_sample"], "pairs_ms": t["samples"]}
                               for m, t in timings.items()}}
        del sessions
        np.save(Path(tmp) / "batch.npy", batch)
        memory = {"once": _memory(report.path, "once", tmp, args.threads),
                  "dense": _memory(dense_path, "once", tmp, args.threads)}
        if args.per_call:
            memory["per_call"] = _memory(report.path, "per_call", tmp, args.threads)
    print(f"{name}: {report.file_bytes:,} B vs dense {report.dense_file_bytes:,} B ({report.file_ratio:.2f}x), "
          f"export {seconds:.0f}s; ORT once {latency['ratio']['once']:.2f}x dense", file=sys.stderr)
    return {"model": name, "input": list(spec.test_input_shape), "ratio_params": nesc.summary(frozen, False).ratio,
            "file_bytes": report.file_bytes, "tensor_bytes": report.tensor_bytes,
            "expected_bytes": report.expected_bytes, "dense_file_bytes": report.dense_file_bytes,
            "dense_tensor_bytes": report.dense_tensor_bytes, "file_ratio": report.file_ratio,
            "export_s": seconds, "ops": list(report.ops), "ort_rel_err": rel_err, "folded_ops": folded,
            "same_graph_as_dense": same_graph, "ort_ms": latency["ms"], "ort_ratio": latency["ratio"],
            "ort_samples_ms": latency["samples"], "memory": memory}


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _graph_ops(path: Path) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node).items()))


def _pools_left(path: Path) -> bool:
    return any(t.name.startswith("nesc_pool_") for t in onnx.load(str(path)).graph.initializer)


def _interleaved(session, dense, x: np.ndarray, reps: int) -> dict:
    """``session`` against ``dense`` in ``reps`` rounds, the order alternating. A sample is the mean of
    enough runs to last ~20 ms (a sub-millisecond run alone is mostly noise)."""
    def timed(s, runs: int) -> float:
        start = time.perf_counter()
        for _ in range(runs):
            _run(s, x)
        return (time.perf_counter() - start) * 1e3 / runs

    for _ in range(2):  # warm-up
        timed(session, 1), timed(dense, 1)
    runs = max(1, math.ceil(20 / min(timed(session, 1), timed(dense, 1))))
    samples = []
    for r in range(reps):
        pair = (timed(session, runs), timed(dense, runs)) if r % 2 == 0 else (timed(dense, runs), timed(session, runs))[::-1]
        samples.append(pair)
    return {"ms": statistics.median(c for c, _ in samples), "dense_ms": statistics.median(d for _, d in samples),
            "ratio": statistics.median(c / d for c, d in samples), "runs_per_sample": runs, "samples": samples}


# A fresh process without torch: VmRSS before the session (onnxruntime and numpy imported), the
# session's creation time, VmHWM (peak resident memory) after one run. The options are ort_session's
# (nesc itself is not imported: it brings torch). /proc/self/status: Linux.
_MEMORY_PROBE = """
import json, sys, time
import numpy as np, onnxruntime as ort
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
path, regenerate, batch, threads = sys.argv[1:]
x = np.load(batch)
before = status("VmRSS")
options = ort.SessionOptions()
options.intra_op_num_threads, options.log_severity_level = int(threads), 3
start = time.perf_counter()
s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["ConstantFolding"] if regenerate == "per_call" else [])
create = time.perf_counter() - start
s.run(None, {s.get_inputs()[0].name: x})
print(json.dumps({"before_mib": before, "peak_mib": status("VmHWM"), "after_mib": status("VmRSS"), "create_s": create}))
"""


def _memory(path: Path, regenerate: str, tmp: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), regenerate, str(Path(tmp) / "batch.npy"),
                          str(threads)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"session_peak_mib": result["peak_mib"] - result["before_mib"]}


def markdown(facts: dict, rows: list[dict], args) -> str:
    per_call = all("per_call" in r["ort_ratio"] for r in rows)
    lines = [
        "# ONNX export: file size and onnxruntime speed and memory next to the dense model's",
        "",
        f"Command: `{facts['command']}`  ",
        (f"{facts['date']}; {facts['machine']}; torch {facts['torch']}, onnxruntime {facts['onnxruntime']}, "
         f"{facts['threads']} thread(s). Ratio {args.ratio:g}, opset 18, onnxsim-simplified, batch symbolic."),
        "",
        "## Sizes",
        "",
        ("| model | input | params ratio | file bytes | dense file bytes | file ratio | tensor bytes | dense tensor bytes "
         "| export s (both) | ORT rel. error |"),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['ratio_params']:.2f}x | {r['file_bytes']:,} "
            f"| {r['dense_file_bytes']:,} | **{r['file_ratio']:.2f}x** | {r['tensor_bytes']:,} | {r['dense_tensor_bytes']:,} "
            f"| {r['export_s']:.0f} | {max(r['ort_rel_err'].values()):.1e} |")
    lines += [
        "",
        ("File ratio = dense file / compressed file; the gap to the params ratio is the graph itself (nodes, names, "
         "shapes), which both files carry. ORT rel. error: max abs error against the frozen model in eager PyTorch "
         "over the output scale (batch 3), the worse of the two sessions."),
        "",
        f"## onnxruntime at batch {args.batch}: latency and peak resident memory",
        "",
        "| model | folded = dense graph | once ms | dense ms | **once / dense** | "
        + ("per-call ms | per-call / dense | " if per_call else "")
        + "peak MiB once | dense | " + ("per-call | " if per_call else "") + "session s once | dense |",
        "|---|:-:|--:|--:|--:|" + ("--:|--:|" if per_call else "") + "--:|--:|" + ("--:|" if per_call else "") + "--:|--:|",
    ]
    for r in rows:
        ms, ratio, mem = r["ort_ms"], r["ort_ratio"], r["memory"]
        lines.append(
            f"| {r['model']} | {'yes' if r['same_graph_as_dense'] else '**no**'} | {ms['once']:.2f} | {ms['dense']:.2f} "
            f"| **{ratio['once']:.2f}x** | "
            + (f"{ms['per_call']:.2f} | {ratio['per_call']:.2f}x | " if per_call else "")
            + f"{mem['once']['session_peak_mib']:.1f} | {mem['dense']['session_peak_mib']:.1f} | "
            + (f"{mem['per_call']['session_peak_mib']:.1f} | " if per_call else "")
            + f"{mem['once']['create_s']:.2f} | {mem['dense']['create_s']:.2f} |")
    lines += [
        "",
        ("once: the compressed file in a default session (`ort_session(path)`, i.e. onnxruntime's defaults), which "
         "folds every regenerated weight into a dense initializer when it is created; per-call: constant folding "
         "disabled (`regenerate=\"per_call\"`), every run regenerates every weight. Ratios: medians of per-round "
         f"ratios over {args.reps} rounds, each mode interleaved with dense (a sample: the mean of as many runs as "
         "last ~20 ms). Folded = dense graph: the graph onnxruntime runs "
         "(`optimized_model_filepath`) has the dense file's ops and no pool. Peak MiB: VmHWM of a fresh process "
         "(no torch) that creates the session and runs one batch, minus its resident memory before (onnxruntime "
         "imported); session s: the session's creation, where the folding happens."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
