"""Reuse benchmark: what ``passes.reuse``'s folds and product maps save in multiply-adds and in latency.

For every model (``--models``; default mobilenetv2 and resnet18) at every ``--ratios`` (2, 4, 8),
with pools drawn at random (``init="random"``: counts and latency do not depend on the values):

* ``dense``: the registry model;
* ``nesc``: ``nesc.freeze(nesc.transform(model, x, NESConfig(ratio=r, reuse=False, init="random")))``;
* ``reuse``: the same with ``reuse=True`` (= ``"inputs"``), whose routing ``passes.reuse`` (in the freeze
  pipeline) folds;
* ``outputs``: ``reuse="outputs"``: one input routing per layer, so the pass also shares each layer's products.

Multiply-adds per example (batch 1): ``FlopCounterMode``'s total flops / 2 (what torch's own counter
says the graph runs) next to ``nesc.report``'s ``madd``, the folds' and interpolations' ``adds``, the once-per-forward
cost of regenerating the weights; which layers folded (``frozen.meta[names.REUSE]``).

Latency at every ``--batches`` size (1 and 8): the three built by ``nesc.compile`` for this CPU with the
default schedules (no tuning; one static build per batch size, as bench_tvm), and the same in eager
PyTorch (eval, ``no_grad``), all timed in one interleaved loop per ratio and batch (bench_core's
``interleaved``); ratios are medians of per-round ratios. Parity: every compiled output against its
eager PyTorch model (max abs error / output scale).

Threads: ``--threads`` (default 1) for torch and TVM alike, so that neither variant gets more cores
than the other and the benchmark leaves the rest of a shared machine alone.

    python benchmarks/bench_reuse.py                                    # mobilenetv2, resnet18 at 224x224
    python benchmarks/bench_reuse.py --models cnn1d --ratios 4 --batches 1 --reps 2

Writes ``benchmarks/results/reuse.json`` (every sample, every fold decision) and ``reuse.md``.
Targets (the reuse issue), at 4x: nesc+reuse runs >= 25% fewer multiply-adds than dense (FlopCounterMode
on the frozen model), and its compiled latency is below the dense model's at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py

import torch
from bench_core import (NOISY_SPREAD, RESULTS, console, forward, input_shape, interleaved, machine_facts, model_names,
                        run_models, write_results)
from bench_tvm import rel_error
from rich.progress import Progress
from torch.utils.flop_counter import FlopCounterMode

import nesc
from nesc import NESConfig
from nesc.core import names
from nesc.models import get_spec
from nesc.report import build_report

DEFAULT_MODELS = "mobilenetv2,resnet18"
VARIANTS = ("dense", "nesc", "reuse", "outputs")
LABELS = {"dense": "dense", "nesc": "nesc", "reuse": "nesc+reuse", "outputs": "nesc+reuse outputs"}
REUSE_OF = {"nesc": False, "reuse": "inputs", "outputs": "outputs"}  # NESConfig.reuse of each variant
REUSED = ("reuse", "outputs")
TARGET_RATIO, TARGET_MADD_CUT = 4.0, 0.25  # at 4x: >= 25% fewer multiply-adds than dense
PARITY = 1e-4  # max abs error / output scale of a compiled model against eager: float32 rounding is ~1e-6


@dataclass(frozen=True)
class Settings:
    """What ``bench_core.interleaved`` reads, plus this benchmark's own choices."""

    ratios: tuple[float, ...]
    batches: tuple[int, ...]
    reps: int
    warmup: int
    measure_budget_s: float
    min_reps: int
    test_size: bool
    threads: int


@dataclass
class Cost:
    """Per example: what one variant computes."""

    flop_madd: int  # FlopCounterMode total flops / 2, batch 1
    report_madd: int  # nesc.report: multiply-adds of the weight-bearing ops
    adds: int  # nesc.report: additions of the input-channel folds and product interpolations
    regen_madd: int  # nesc.report: multiply-adds regenerating the weights, once per forward (any batch)
    stored_params: int


@dataclass
class Run:
    """One ratio at one batch size: samples (ms) of every variant compiled and eager, parity of the compiled."""

    ratio: float
    batch: int
    ms: dict[str, list[float]] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)

    def median(self, v: str) -> float:
        return statistics.median(self.ms[v])

    def over(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.ms[a], self.ms[b]))

    def to_dict(self) -> dict:
        over = {f"{k}_{v}/{k}_dense": self.over(f"{k}_{v}", f"{k}_dense") for k in ("tvm", "torch") for v in VARIANTS[1:]}
        # Noise on a shared machine only adds time: the ratio of the fastest rounds is a cross-check.
        of_min = {f"{k}_{v}/{k}_dense": min(self.ms[f"{k}_{v}"]) / min(self.ms[f"{k}_dense"])
                  for k in ("tvm", "torch") for v in VARIANTS[1:]}
        return asdict(self) | {"median_ms": {v: self.median(v) for v in self.ms}, "median_of_ratios": over,
                               "ratio_of_min": of_min}


@dataclass
class Result:
    model: str
    input_shape: tuple[int, ...]
    dense: Cost | None = None
    costs: dict[str, dict[str, Cost]] = field(default_factory=dict)  # ratio -> nesc / reuse -> Cost
    decisions: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # ratio -> variant -> layer -> why
    fold_rel_error: dict[str, float] = field(default_factory=dict)  # "ratio variant" -> rewritten frozen vs trained
    build_s: dict[str, float] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def run(self, ratio: float, batch: int) -> Run | None:
        return next((r for r in self.runs if r.ratio == ratio and r.batch == batch), None)

    def targets(self, batches: tuple[int, ...]) -> list[str]:
        """One line per target at 4x: met or missed, with the numbers."""
        key = f"{TARGET_RATIO:g}"
        if self.error or key not in self.costs:
            return [f"not measured ({'failed' if self.error else f'ratio {key} not in --ratios'})"]
        lines = []
        for v in REUSED:
            cut = 1 - self.costs[key][v].flop_madd / self.dense.flop_madd
            lines.append(f"{LABELS[v]} MAdd: {cut:.1%} fewer than dense (target >= {TARGET_MADD_CUT:.0%}): "
                         f"{'met' if cut >= TARGET_MADD_CUT else 'missed'}")
            for batch in (1, 8):
                run = self.run(TARGET_RATIO, batch)
                if run is None:
                    lines.append(f"{LABELS[v]} TVM latency batch {batch}: not measured (batch not in --batches {batches})")
                    continue
                over, err = run.over(f"tvm_{v}", "tvm_dense"), run.rel_error[f"tvm_{v}"]
                wrong = f" (but the compiled output is wrong: error {err:.1e}, see Flags)" if err > PARITY else ""
                lines.append(f"{LABELS[v]} TVM latency batch {batch}: {run.median(f'tvm_{v}'):.1f} ms vs dense "
                             f"{run.median('tvm_dense'):.1f} ms, {over:.2f}x (target < 1): "
                             f"{'met' if over < 1 else 'missed'}{wrong}")
        return lines

    def to_dict(self) -> dict:
        return asdict(self) | {"runs": [r.to_dict() for r in self.runs]}


# ------------------------------------------------------------------------------------------- measuring


def cost(module: torch.nn.Module, x1: torch.Tensor, example: tuple) -> Cost:
    """The multiply-adds of one example, by torch's counter and by nesc's report."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x1)
    graph = module if hasattr(module, "graph") else nesc.capture(module, example)
    report = build_report(graph)
    return Cost(counter.get_total_flops() // 2, report.madd, report.adds, sum(r.regen_madd for r in report.rows),
                report.stored_params)


def fold_summary(decisions: dict[str, str]) -> str:
    """``34 folded+shared, 15 kept: grouped conv (...)``: the pass's decisions, counted by kind."""
    counts = Counter("+".join(p.split(":")[0] for p in d.split("; ") if not p.startswith("kept")) or d
                     for d in decisions.values())
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


def bench_model(name: str, s: Settings, progress: Progress) -> Result:
    spec = get_spec(name)
    shape = spec.test_input_shape if s.test_size else spec.input_shape
    result = Result(name, shape)
    torch.manual_seed(0)
    model = spec.create().eval()
    example = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)),)
    x1 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    result.dense = cost(model, x1, example)

    frozen: dict[tuple[str, str], torch.nn.Module] = {}  # (ratio, variant) -> frozen model
    for ratio in s.ratios:
        key = f"{ratio:g}"
        result.costs[key], result.decisions[key], trained = {}, {}, {}
        for variant in VARIANTS[1:]:
            t0 = time.perf_counter()
            config = NESConfig(ratio=ratio, reuse=REUSE_OF[variant], init="random")
            trained[variant] = nesc.transform(model, example, config)
            frozen[key, variant] = nesc.freeze(trained[variant])
            result.build_s[f"transform_freeze_{variant}_r{key}"] = time.perf_counter() - t0
            result.costs[key][variant] = cost(frozen[key, variant], x1, example)
            result.decisions[key][variant] = dict(frozen[key, variant].meta[names.REUSE])
        with torch.no_grad():  # the rewrite is exact: the rewritten frozen model against the model as trained
            for v in REUSED:
                result.fold_rel_error[f"{key} {v}"] = rel_error(frozen[key, v](x1), trained[v].eval()(x1))

    builds = progress.add_task(f"{name}: builds", total=len(s.batches) * (1 + (len(VARIANTS) - 1) * len(s.ratios)))
    for batch in s.batches:
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()
        dense_tvm = build(model, x, result, f"tvm_dense_b{batch}", progress, builds)
        for ratio in s.ratios:
            key = f"{ratio:g}"
            eager = {"dense": model} | {v: frozen[key, v] for v in VARIANTS[1:]}
            compiled = {"dense": dense_tvm} | {v: build(eager[v], x, result, f"tvm_{v}_r{key}_b{batch}", progress, builds)
                                               for v in VARIANTS[1:]}
            run = Run(ratio, batch)
            with torch.no_grad():
                run.rel_error = {f"tvm_{v}": rel_error(compiled[v](xn), eager[v](x)) for v in VARIANTS}
            fns = {f"tvm_{v}": (lambda c=compiled[v], xn=xn: c(xn)) for v in VARIANTS}
            fns |= {f"torch_{v}": forward(eager[v], x) for v in VARIANTS}
            run.ms = interleaved(fns, s, progress, f"{name} {key}x batch {batch}").ms
            result.runs.append(run)
            if not console.is_terminal:  # no live bars in a log file: one line per loop instead
                console.print(f"{name} {key}x batch {batch}: TVM / dense " + ", ".join(
                    f"{LABELS[v]} {run.over(f'tvm_{v}', 'tvm_dense'):.2f}x" for v in VARIANTS[1:]))
    progress.remove_task(builds)
    return result


def build(module: torch.nn.Module, x: torch.Tensor, result: Result, label: str, progress: Progress, task):
    t0 = time.perf_counter()
    compiled = nesc.compile(module, (x,))
    result.build_s[label] = time.perf_counter() - t0
    progress.advance(task)
    return compiled


# ----------------------------------------------------------------------------------------------- output


def markdown(facts: dict, s: Settings, results: list[Result]) -> str:
    sizes = "test input sizes (each model's `test_input_shape`)" if s.test_size else "full input sizes"
    lines = [
        "# nesc reuse benchmark: input-channel folding and product maps (`passes.reuse`)", "",
        f"Command: `{facts['command']}`", "",
        f"{facts['date']}; {facts['cpu']} ({facts['cpu_count']} cores), torch {facts['torch']}, TVM {facts['tvm']}; "
        f"git {facts['git']}; load average {facts['loadavg_start'][0]:.1f} at start, {facts['loadavg_end'][0]:.1f} at "
        f"end (above the core count, other processes shared the CPU: absolute ms are inflated, the interleaved "
        f"ratios much less so); wall time {facts['wall_s']:.0f} s.", "",
        f"Threads: torch {facts['torch_threads']}, TVM runtime {facts['tvm_runtime_threads']} "
        f"(`--threads {s.threads}`; env {', '.join(f'{k}={v}' for k, v in facts['env'].items())}).", "",
        f"Ratios {', '.join(f'{r:g}' for r in s.ratios)}; {sizes}; pools drawn at random (`init=\"random\"`), "
        f"otherwise `NESConfig` defaults. MAdd per example at batch 1: `FlopCounterMode` total flops / 2 "
        f"(the report's `madd` is shown only where it differs); adds: the folds' additions and the product maps' "
        f"interpolations (`report.adds`), nesc+reuse / outputs. Variants: nesc (`reuse=False`), nesc+reuse "
        f"(`reuse=True`: input channels fold), nesc+reuse outputs (`reuse=\"outputs\"`: products shared too). Latency: "
        f"`nesc.compile`, default schedules, no tuning, one build per batch size; {s.warmup} warm-up + up to "
        f"{s.reps} interleaved rounds (>= {s.min_reps}; every variant of a ratio and batch in one loop); "
        f"ms are medians, ratios medians of per-round ratios. Denormals flushed to zero.", "",
    ]
    for r in results:
        lines += model_section(r, s)
    lines += ["## Targets at 4x", "",
              f"At least {TARGET_MADD_CUT:.0%} fewer multiply-adds than dense (FlopCounterMode on the frozen "
              f"model), and compiled (TVM) latency below dense at batch 1 and 8; for each reuse level.", ""]
    for r in results:
        lines += [f"- {r.model}:"] + [f"  - {t}" for t in r.targets(s.batches)]
    flags = [f for r in results for f in _flags(r)]
    if flags:
        lines += ["", "## Flags", ""] + [f"- {f}" for f in flags]
    return "\n".join(lines) + "\n"


def _flags(r: Result) -> list[str]:
    """What not to trust blindly: compiled outputs that disagree with eager, noisy ratios."""
    out = []
    for run in r.runs:
        where = f"{r.model} {run.ratio:g}x batch {run.batch}"
        out += [f"{where}: compiled {LABELS[v.removeprefix('tvm_')]} disagrees with eager PyTorch (max abs error / "
                f"output scale {e:.1e} > {PARITY:g}): its time is that of a wrong program"
                for v, e in run.rel_error.items() if e > PARITY]
        for v in REUSED:
            ratios = [a / b for a, b in zip(run.ms[f"tvm_{v}"], run.ms["tvm_dense"])]
            if max(ratios) / min(ratios) > NOISY_SPREAD:
                out.append(f"{where}: per-round TVM {LABELS[v]} / dense ratios range {min(ratios):.2f}x-"
                           f"{max(ratios):.2f}x (noisy machine?)")
    out += [f"{r.model} {k}: the rewritten frozen model differs from the model as trained ({e:.1e})"
            for k, e in r.fold_rel_error.items() if e > PARITY]
    return out


def model_section(r: Result, s: Settings) -> list[str]:
    shape = "x".join(map(str, r.input_shape))
    lines = [f"## {r.model} ({shape})", ""]
    if r.error:
        return lines + [f"failed: `{r.error.strip().splitlines()[-1]}`", ""]
    d = r.dense
    head = ["ratio", "stored (x smaller) nesc / +reuse / outputs"] + [f"MAdd {LABELS[v]}" for v in VARIANTS] + ["adds"]
    head += [f"TVM ms b{b} " + " / ".join(VARIANTS) for b in s.batches]
    head += [f"b{b} outputs / reuse / nesc, over dense" for b in s.batches]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for key, c in r.costs.items():
        ratio = float(key)
        cells = [f"{key}x", " / ".join(f"{d.stored_params / c[v].stored_params:.2f}" for v in VARIANTS[1:]),
                 _madd(d, d)] + [_madd(c[v], d) for v in VARIANTS[1:]] + [" / ".join(f"{c[v].adds:,}" for v in REUSED)]
        runs = [r.run(ratio, b) for b in s.batches]
        cells += [" / ".join(_ms(run.median(f"tvm_{v}")) for v in VARIANTS) for run in runs]
        cells += [f"**{run.over('tvm_outputs', 'tvm_dense'):.2f}x** / {run.over('tvm_reuse', 'tvm_dense'):.2f}x / "
                  f"{run.over('tvm_nesc', 'tvm_dense'):.2f}x" for run in runs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Eager PyTorch (what a user of the frozen model in PyTorch gets), and parity of the compiled "
              "models (max abs error / output scale against eager):", ""]
    head = ["ratio", "batch", "eager ms " + " / ".join(VARIANTS), "eager outputs / reuse / nesc, over dense",
            "TVM err " + " / ".join(VARIANTS), "n"]
    lines += ["| " + " | ".join(head) + " |", "|---|--:|--:|--:|--:|--:|"]
    for run in r.runs:
        lines.append(
            f"| {run.ratio:g}x | {run.batch} | " + " / ".join(_ms(run.median(f"torch_{v}")) for v in VARIANTS)
            + " | " + " / ".join(f"{run.over(f'torch_{v}', 'torch_dense'):.2f}x" for v in ("outputs", "reuse", "nesc"))
            + " | " + " / ".join(f"{run.rel_error[f'tvm_{v}']:.1e}" for v in VARIANTS) + f" | {len(run.ms['tvm_dense'])} |")
    lines += ["", "What `passes.reuse` did (`frozen.meta[names.REUSE]`, counted by kind), the cost of regenerating "
              "the weights (MAdd, once per forward whatever the batch), and the rewritten model against the model "
              "as trained:", ""]
    for key, c in r.costs.items():
        lines.append(f"- {key}x: " + "; ".join(f"{LABELS[v]}: {fold_summary(r.decisions[key][v])}" for v in VARIANTS[1:])
                     + "; regeneration " + " / ".join(f"{c[v].regen_madd:,}" for v in VARIANTS[1:])
                     + "; rewrite error " + " / ".join(f"{r.fold_rel_error[f'{key} {v}']:.1e}" for v in REUSED))
    return lines + [""]


def _madd(c: Cost, dense: Cost) -> str:
    """``167,414,592 (-44.3%)``; the report's count only where it differs from torch's counter."""
    cut = "" if c is dense else f" ({c.flop_madd / dense.flop_madd - 1:+.1%})"
    differs = "" if c.report_madd == c.flop_madd else f", report {c.report_madd:,}"
    return f"{c.flop_madd:,}{cut}{differs}"


def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated registry names (default {DEFAULT_MODELS})")
    p.add_argument("--ratios", default="2,4,8", help="comma-separated compression ratios (default 2,4,8)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--reps", type=int, default=7, help="timed interleaved rounds (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--measure-budget-s", type=float, default=60.0, help="cap one loop's rounds at ~this (60)")
    p.add_argument("--min-reps", type=int, default=3, help="but time at least this many rounds (default 3)")
    p.add_argument("--test-size", action="store_true", help="use each model's reduced test_input_shape")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and for the TVM runtime (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    p.add_argument("--name", default="reuse", help="output file stem (default reuse)")
    args = p.parse_args(argv)
    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--ratios and --batches must be comma-separated numbers; got {args.ratios!r}, {args.batches!r}")
    if min(args.reps, args.min_reps, args.threads, *batches) < 1 or args.warmup < 0 or min(ratios) < 1:
        p.error("--reps, --min-reps, --threads and batch sizes must be >= 1, ratios >= 1, --warmup >= 0")
    return args, Settings(ratios, batches, args.reps, args.warmup, args.measure_budget_s, min(args.min_reps, args.reps),
                          args.test_size, args.threads)


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    # TVM sizes its thread pool from TVM_NUM_THREADS when the runtime first starts one: set it before.
    os.environ["TVM_NUM_THREADS"] = str(settings.threads)
    torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)  # see bench_core.py: untrained deep nets reach denormals
    import tvm

    names_ = model_names(args.models)
    facts = machine_facts() | {"tvm": tvm.__version__,
                               "tvm_runtime_threads": tvm.get_global_func("runtime.NumThreads")()}
    facts["env"] |= {"TVM_NUM_THREADS": os.environ["TVM_NUM_THREADS"]}
    t0 = time.perf_counter()
    results = run_models(names_, lambda name, progress: bench_model(name, settings, progress),
                         lambda name, error: Result(name, input_shape(name, settings.test_size), error=error))
    facts["wall_s"] = time.perf_counter() - t0
    facts["loadavg_end"] = os.getloadavg()
    return write_results(args.out / args.name, facts, settings, results, markdown(facts, settings, results))


if __name__ == "__main__":
    sys.exit(main())
