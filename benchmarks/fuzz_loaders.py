"""Fuzz nesc's loaders of untrusted files: artifacts (``nesc.load``), training checkpoints (resume) and
deploy files (the TVM ``runtime.load``), and count what each mutated input did.

    python benchmarks/fuzz_loaders.py                                # 100,000 inputs, all three targets
    python benchmarks/fuzz_loaders.py --inputs 3000 --targets artifact

Each input is one mutation (``tests/*/mutations``-style: raw byte flips, truncations and splices, and
structured edits of header documents and tensors with the digest recomputed, as an attacker would)
of a file a tiny model wrote. Inputs run in worker processes, so that a crash (a segfault in native
code) is seen and counted, not fatal; each worker records, through an audit hook, every file opened
(other than the input and Python sources read for tracebacks), process started, socket connected and
module newly imported while loading. Outcomes per input:

    refused      the project's error (ArtifactError / CheckpointError / DeployError ...)
    loaded       it loaded, and the loaded model ran on its recorded inputs
    unexpected   the project's error raised by the loaders' last-resort guard (a check nesc lacks)
    other        any other exception, from loading or from running what loaded
    crash        the worker process died
    side effect  anything the audit hook recorded (counted on top of the outcome)

Per-input results (resumable: finished chunks are kept; not committed) go to
``benchmarks/results/fuzz/<target>.jsonl``, the summary to ``benchmarks/results/fuzz.md`` and ``fuzz.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHUNK = 500
SHARE = {"artifact": 0.6, "checkpoint": 0.2, "deploy": 0.2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs in total, shared out by SHARE")
    parser.add_argument("--targets", default="artifact,checkpoint,deploy")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--range", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from fuzz_targets import run_worker

        return run_worker(args.worker, *args.range, args.work_dir)
    targets = args.targets.split(",")
    total = sum(SHARE[t] for t in targets)
    counts = {t: round(args.inputs * SHARE[t] / total) for t in targets}
    started = time.perf_counter()
    for target, n in counts.items():
        run_target(target, n)
    write_summary(counts, args, time.perf_counter() - started)
    return 0


def run_target(target: str, n: int) -> None:
    """Run inputs 0..n-1 of ``target`` in chunks; a chunk already in the results file is skipped."""
    out = RESULTS / "fuzz" / f"{target}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["i"] for line in out.read_text().splitlines()} if out.exists() else set()
    work = RESULTS / "fuzz" / f".work-{target}"
    work.mkdir(exist_ok=True)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        todo = [i for i in range(lo, hi) if i not in done]
        if todo:
            _run_chunk(target, todo[0], hi, work, out, done)
        print(f"{target}: {min(hi, n):,}/{n:,}", file=sys.stderr, flush=True)


def _run_chunk(target: str, lo: int, hi: int, work: Path, out: Path, done: set) -> None:
    """Workers print one JSON line per finished input after a "start i" line; if one dies, the input it
    started is a crash and the next worker continues after it."""
    while lo < hi:
        cmd = [sys.executable, __file__, "--worker", target, "--range", str(lo), str(hi), "--work-dir", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        started, rows = None, []
        for line in proc.stdout.splitlines():
            if line.startswith("start "):
                started = int(line.split()[1])
            elif line.startswith("{"):
                rows.append(json.loads(line))
                started = None
        if proc.returncode != 0 and started is None and not rows:
            raise RuntimeError(f"worker for {target} failed before any input:\n{proc.stderr[-3000:]}")
        if proc.returncode != 0 and started is not None:
            rows.append({"i": started, "outcome": "crash", "type": f"exit {proc.returncode}", "effects": []})
        with open(out, "a") as f:
            for row in rows:
                if row["i"] not in done:
                    f.write(json.dumps(row) + "\n")
                    done.add(row["i"])
        lo = max([r["i"] for r in rows], default=lo - 1) + 1


def write_summary(counts: dict[str, int], args, seconds: float) -> None:
    lines = ["# Fuzzing the loaders of untrusted files", "",
             f"Command: `python benchmarks/fuzz_loaders.py --inputs {args.inputs} --targets {args.targets}` "
             f"(this run: {seconds / 60:.0f} min on this machine; finished chunks of earlier runs are reused).", "",
             "| target | inputs | refused (project error) | loaded and ran | unexpected (guard) | other exceptions "
             "| crashes | inputs with side effects |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    details, summary = [], {"command": f"python benchmarks/fuzz_loaders.py --inputs {args.inputs} --targets "
                                       f"{args.targets}", "targets": {}}
    for target in counts:
        rows = [json.loads(line) for line in (RESULTS / "fuzz" / f"{target}.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["i"] < counts[target]]
        c = Counter(r["outcome"] for r in rows)
        effects = sum(bool(r["effects"]) for r in rows)
        lines.append(f"| {target} | {len(rows):,} | {c['refused']:,} | {c['loaded']:,} | {c['unexpected']:,} | "
                     f"{c['other']:,} | {c['crash']:,} | {effects:,} |")
        kinds = Counter(r["type"] for r in rows if r["outcome"] != "loaded")
        summary["targets"][target] = {"inputs": len(rows), "outcomes": dict(c), "with side effects": effects,
                                      "refusals by kind": dict(kinds.most_common())}
        details.append(f"- {target}: " + ", ".join(f"{k} {v:,}" for k, v in kinds.most_common(8)))
        bad = [r for r in rows if r["outcome"] in ("unexpected", "other", "crash") or r["effects"]][:5]
        details += [f"  - input {r['i']}: {r['outcome']} {r['type']}: {r.get('message', '')[:160]}" for r in bad]
    lines += ["", "Most frequent error types, and the first inputs that were not clean (if any):", ""] + details
    (RESULTS / "fuzz.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "fuzz.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
