"""Artifact benchmark: ``.nesc`` file sizes next to the dense model's, in format 3 and in format 2.

For every model (``--models a,b``) at ``--ratio``: ``nesc.transform`` (``--init``, default the
least-squares fit), ``nesc.freeze``, ``nesc.save``; the dense model captured (``nesc.capture``) and saved
the same way. Per model:

* stored-param ratio: ``nesc.report``'s dense parameters / stored parameters; stored bytes:
  ``nesc.stored_bytes`` (pools, routing maps, dense layers);
* tensor bytes: what the file's tensors hold, the stored bytes plus buffers (batch-norm statistics,
  which both files carry and no ratio counts);
* file bytes now (format 3) and before (format 2: the same artifact re-encoded the way ``nesc.save``
  wrote it before format 3, documents as metadata entries and one safetensors entry per tensor; the
  byte counts equal those of files the old writer wrote), for the artifact and the dense file;
* file ratio = dense file / artifact, before and now, and its gap to the stored-param ratio;
* with batch norms folded into a per-channel scale and shift (``nesc.freeze(gm, fold_batchnorm=True)``,
  ``passes.fold_batchnorm``): the artifact's bytes and its file ratio against the dense file as saved and
  against the dense model folded the same way (what a deployment of the dense model would store).

    python benchmarks/bench_artifact.py                   # cnn1d, mlp, the two fmnist models, the two 224x224
    python benchmarks/bench_artifact.py --models resnet_fmnist

Writes ``benchmarks/results/artifact.json`` and ``artifact.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import nesc
from nesc.models import get_spec
from nesc.passes.find_weights import find_weights
from nesc.passes.fold_batchnorm import fold_batchnorm
from nesc.report import build_report
from nesc.serialize import container
from nesc.serialize.tensors import digest

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = "cnn1d,mlp,resnet_fmnist,mobilenetv2_fmnist,resnet18,mobilenetv2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--init", default="dense", choices=["dense", "random"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows.append(bench(name, args))
        print(json.dumps(rows[-1]), flush=True)
    given = argv if argv is not None else sys.argv[1:]
    command = ("python benchmarks/bench_artifact.py " + shlex.join(given)).rstrip()
    facts = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "torch": torch.__version__, "ratio": args.ratio, "init": args.init}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "artifact.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    (args.out / "artifact.md").write_text(markdown(facts, rows))
    print(markdown(facts, rows))
    return 0


def bench(name: str, args) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.create().eval()
    inputs = spec.example_inputs(2)
    start = time.perf_counter()
    gm = nesc.transform(model, inputs, nesc.NESConfig(ratio=args.ratio, init=args.init))
    frozen = nesc.freeze(gm)
    dense = nesc.capture(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path, dense_path = Path(tmp) / f"{name}.nesc", Path(tmp) / f"{name}_dense.nesc"
        nesc.save(frozen, path)
        nesc.save(dense, dense_path)
        seconds = time.perf_counter() - start
        (file, tensors, before), (dense_file, dense_tensors, dense_before) = _sizes(path), _sizes(dense_path)
        folded_path, dense_folded_path = Path(tmp) / f"{name}_folded.nesc", Path(tmp) / f"{name}_dense_folded.nesc"
        nesc.save(nesc.freeze(gm, fold_batchnorm=True), folded_path)
        find_weights(dense)  # the fold reads the shapes its shape propagation writes
        nesc.save(fold_batchnorm(dense.eval()).graph_module, dense_folded_path)
        folded, dense_folded = folded_path.stat().st_size, dense_folded_path.stat().st_size
    report = build_report(frozen)
    return {"model": name, "input": list(spec.input_shape), "dense_params": report.dense_params,
            "stored_params": report.stored_params, "stored_ratio": report.ratio,
            "stored_bytes": nesc.stored_bytes(frozen),
            "tensor_bytes": tensors, "dense_tensor_bytes": dense_tensors, "file_bytes": file,
            "dense_file_bytes": dense_file, "file_bytes_v2": before, "dense_file_bytes_v2": dense_before,
            "file_ratio": dense_file / file, "file_ratio_v2": dense_before / before,
            "tensor_ratio": dense_tensors / tensors, "folded_file_bytes": folded,
            "dense_folded_file_bytes": dense_folded, "folded_file_ratio": dense_file / folded,
            "folded_file_ratio_folded_dense": dense_folded / folded, "seconds": seconds}


def _sizes(path: Path) -> tuple[int, int, int]:
    """(file bytes, bytes of the tensors it holds, file bytes in format 2) of a format-3 artifact."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    documents, tensors = container.unpack(load_tensors(data))
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return len(data), tensor_bytes, _format2_bytes(meta, documents, tensors)


def _format2_bytes(meta: dict, documents: dict, tensors: dict) -> int:
    """Bytes of the same artifact as ``nesc.save`` wrote it in format 2: the documents as metadata entries
    in ``json.dumps``'s default spacing, each tensor a safetensors entry, the digest over both."""
    old = {k: v for k, v in meta.items() if k != "sha256"} | {"format_version": "2"}
    old |= {k: json.dumps(json.loads(documents[k])) for k in container.DOCUMENTS}
    old["sha256"] = digest(tensors, old)
    return len(save_tensors(tensors, metadata=old))


def markdown(facts: dict, rows: list[dict]) -> str:
    lines = [
        "# .nesc artifact sizes: format 3 (compressed documents, packed tensors) against format 2",
        "",
        "Command:",
        "",
        "```",
        facts["command"],
        "```",
        "",
        (f"{facts['date']}; {facts['machine']}; torch {facts['torch']}. Ratio {facts['ratio']:g}, pools "
         f"initialised "
         f"{'by the least-squares fit' if facts['init'] == 'dense' else 'at random'}; inputs at each model's "
         f"input shape, batch 2. Dense file: the dense model captured and saved with nesc.save."),
        "",
        "| model | input | dense params | stored-param ratio | stored bytes | tensor bytes | tensor ratio "
        "| artifact bytes (format 2) | artifact bytes (format 3) | dense file bytes (2 / 3) | file ratio (2) "
        "| **file ratio (3)** | gap to stored ratio | artifact bytes, BN folded | **file ratio, BN folded** "
        "| gap | file ratio, both folded | s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        gap = r["file_ratio"] / r["stored_ratio"] - 1
        folded_gap = r["folded_file_ratio"] / r["stored_ratio"] - 1
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['dense_params']:,} | {r['stored_ratio']:.2f}x "
            f"| {r['stored_bytes']:,} | {r['tensor_bytes']:,} | {r['tensor_ratio']:.2f}x | {r['file_bytes_v2']:,} "
            f"| {r['file_bytes']:,} "
            f"| {r['dense_file_bytes_v2']:,} / {r['dense_file_bytes']:,} | {r['file_ratio_v2']:.2f}x "
            f"| **{r['file_ratio']:.2f}x** | {gap:+.1%} | {r['folded_file_bytes']:,} "
            f"| **{r['folded_file_ratio']:.2f}x** | {folded_gap:+.1%} | {r['folded_file_ratio_folded_dense']:.2f}x "
            f"| {r['seconds']:.0f} |")
    lines += ["", (
        "File ratio = dense file bytes / artifact bytes. Tensor bytes = stored bytes + buffers (batch-norm running "
        "statistics): both files hold the buffers and no parameter ratio counts them, so tensor ratio = dense tensor "
        "bytes / tensor bytes is the most any lossless encoding of these tensors can reach. "
        "Format 2 bytes are the format-3 artifact re-encoded as nesc.save wrote format 2 (the same byte count as "
        "a file the old writer wrote). BN folded: nesc.freeze(gm, fold_batchnorm=True), every batch norm stored as "
        "a per-channel scale and shift (two tensors instead of four, outputs equal up to float rounding); its file "
        "ratio is against the dense file as saved, and (both folded) against the dense model folded the same way. "
        "s = transform + freeze + both saves."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
