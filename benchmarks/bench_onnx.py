"""ONNX benchmark: file sizes of the compressed export next to the dense model's, per registered model.

For every model (``nesc.models.list_models()`` or ``--models a,b``) at ``--ratio`` (pools drawn at
random: sizes and timings do not depend on the values):

* ``nesc.export_onnx(frozen, inputs, path, dense=model)`` at the model's ``test_input_shape``, batch 2
  (the batch stays symbolic): file bytes and stored tensor bytes, compressed and dense; export seconds
  (one run, both exports);
* onnxruntime (CPU, ``--threads``) against the frozen model in eager PyTorch at batch 3: max abs error
  relative to the output scale;
* onnxruntime forward latency at batch ``--batch``, compressed vs dense file, interleaved, median of
  ``--reps`` per-round ratios (onnxruntime folds the regeneration into constants when it creates the
  session, so this is expected near 1: the file is small, the session is not).

    python benchmarks/bench_onnx.py                       # every model (2-core CPU: ~15-25 min)
    python benchmarks/bench_onnx.py --models mlp,cnn1d

Writes ``benchmarks/results/onnx.json`` (every sample) and ``onnx.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py: no spin-wait stalls on a shared CPU

import numpy as np
import onnxruntime as ort
import torch
from nesc.backends.onnx import export_dense_onnx
from nesc.models import get_spec, list_models

import nesc

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(list_models()))
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
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
        compressed = _session(report.path, args.threads)
        got = compressed.run(None, {compressed.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = frozen(x).numpy()
        rel_err = float(np.abs(got - want).max() / np.abs(want).max())
        latency = _interleaved(compressed, _session(dense_path, args.threads),
                               spec.example_inputs(args.batch, test=True)[0].numpy(), args.reps)
    print(f"{name}: {report.file_bytes:,} B vs dense {report.dense_file_bytes:,} B ({report.file_ratio:.2f}x), "
          f"export {seconds:.0f}s", file=sys.stderr)
    return {"model": name, "input": list(spec.test_input_shape), "ratio_params": nesc.summary(frozen, False).ratio,
            "file_bytes": report.file_bytes, "tensor_bytes": report.tensor_bytes,
            "expected_bytes": report.expected_bytes, "dense_file_bytes": report.dense_file_bytes,
            "dense_tensor_bytes": report.dense_tensor_bytes, "file_ratio": report.file_ratio,
            "export_s": seconds, "ops": list(report.ops), "ort_rel_err": rel_err, **latency}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _interleaved(compressed, dense, x: np.ndarray, reps: int) -> dict:
    def once(session) -> float:
        start = time.perf_counter()
        session.run(None, {session.get_inputs()[0].name: x})
        return (time.perf_counter() - start) * 1e3

    for _ in range(2):  # warm-up
        once(compressed), once(dense)
    samples = []
    for r in range(reps):
        pair = (once(compressed), once(dense)) if r % 2 == 0 else tuple(reversed((once(dense), once(compressed))))
        samples.append(pair)
    return {"ort_ms_compressed": statistics.median(c for c, _ in samples),
            "ort_ms_dense": statistics.median(d for _, d in samples),
            "ort_ratio": statistics.median(c / d for c, d in samples), "ort_samples_ms": samples}


def markdown(facts: dict, rows: list[dict], args) -> str:
    lines = [
        "# ONNX export: file size next to the dense model's",
        "",
        f"Command: `{facts['command']}`  ",
        (f"{facts['date']}; {facts['machine']}; torch {facts['torch']}, onnxruntime {facts['onnxruntime']}, "
        f"{facts['threads']} threads. Ratio {args.ratio:g}, opset 18, onnxsim-simplified, batch symbolic."),
        "",
        "| model | input | params ratio | file bytes | dense file bytes | file ratio | tensor bytes | dense tensor bytes "
        "| export s (both) | ORT rel. error | ORT ms (batch " + str(args.batch) + ") | dense ms | ORT ratio |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['ratio_params']:.2f}x | {r['file_bytes']:,} "
            f"| {r['dense_file_bytes']:,} | **{r['file_ratio']:.2f}x** | {r['tensor_bytes']:,} | {r['dense_tensor_bytes']:,} "
            f"| {r['export_s']:.0f} | {r['ort_rel_err']:.1e} | {r['ort_ms_compressed']:.2f} | {r['ort_ms_dense']:.2f} "
            f"| {r['ort_ratio']:.2f}x (n={len(r['ort_samples_ms'])}) |")
    lines += ["", ("File ratio = dense file / compressed file; the gap to the params ratio is the graph "
              "itself (nodes, names, shapes), which both files carry. ORT ratio = compressed / dense latency, "
              "median of per-round ratios."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
