"""Core benchmark: what nesc costs and what it buys, per registered model, on this machine's CPU.

For every model (``nesc.models.list_models()`` or ``--models a,b``) at ``--ratio``:

* transform time: ``nesc.transform(model, example_inputs, ratio=r)``, median of ``--transform-reps``;
* compression: dense parameters / ``nesc.stored_params(nesc.freeze(gm))``;
* one training step (forward + cross-entropy + backward + SGD step), transformed vs dense;
* one forward (eval, no_grad), transformed and frozen vs dense (in inference the regenerated weights
  come from ``nesc.core.cache`` while the pools are unchanged; ``--no-cache`` times regeneration);
* for the models of ``--compile``: the same under ``torch.compile`` (dense, nesc training step, frozen
  forward), with compile seconds and graph breaks (``torch._dynamo.explain``).

Timing is *interleaved*: after a warm-up, every repetition times the dense model and the nesc model
back to back (the order alternates between repetitions), and the reported ratio is the median of the
per-repetition ratios. A shared, noisy machine slows both sides of a pair alike, so the ratio stays
meaningful when the absolute milliseconds do not.

Denormal floats are flushed to zero (``torch.set_flush_denormal(True)``; ``--keep-denormals`` to
opt out). The models are freshly initialised: in eval mode their batch norms use the initial running
statistics, and activations of deep nets such as MobileNetV2 and EfficientNet-B0 shrink into the
denormal range (logits ~1e-9 and ~1e-14), where x86 arithmetic is 5-10x slower. That would time an
artefact of untrained weights, not the model, and it hits dense and nesc unequally.

Inputs with an ImageNet-size side (>= ``--large-side``) use ``--large-batch`` (8) instead of
``--batch`` (32), so that a full run stays practical on a 2-core CPU.

    python benchmarks/bench_core.py                          # every model, defaults (2-core CPU: ~5-11 min)
    python benchmarks/bench_core.py --models mlp,cnn1d --test-size --reps 3
    python benchmarks/bench_core.py --compile mlp,cnn1d,resnet_fmnist   # also torch.compile for these

Writes ``benchmarks/results/core.json`` (every sample) and ``core.md`` (the table).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Before torch loads OpenMP: on a CPU shared with other processes, OpenMP's default spin-waiting makes
# a 2-thread op stall for whole scheduler slices when its partner thread is descheduled (measured here:
# an MLP step 3 ms alone, 140 ms next to a test run). Passive waiting removes the stall. Set the
# variable yourself (e.g. OMP_WAIT_POLICY=ACTIVE) to override; the value used is recorded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn import functional as F

import nesc
from nesc.models import get_spec, list_models

RESULTS = Path(__file__).resolve().parent / "results"
# The speed issue's targets at 4x compression: {model: (train step, forward) over dense}; compiled
# frozen forward over compiled dense.
TARGETS = {"mobilenetv2": (1.15, 1.10), "resnet18": (1.15, 1.10), "mlp": (1.5, 1.5)}
TARGET_MODELS = tuple(TARGETS)
TARGET_COMPILED = 1.05

# Environment variables that change CPU timings; recorded with the results.
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "GOMP_CPU_AFFINITY")

console = Console(stderr=True)


@dataclass(frozen=True)
class Settings:
    ratio: float
    reps: int
    warmup: int
    transform_reps: int
    transform_budget_s: float
    batch: int
    large_batch: int
    large_side: int
    test_size: bool
    lr: float
    measure_budget_s: float
    min_reps: int
    compile: tuple[str, ...] = ()

    def batch_for(self, shape: tuple[int, ...]) -> int:
        """Inputs with a spatial side >= ``large_side`` (ImageNet-size) use the smaller batch."""
        return self.large_batch if len(shape) >= 3 and max(shape[1:]) >= self.large_side else self.batch


@dataclass
class Timing:
    """Interleaved samples of two or more variants; ``ratio`` is the median of per-rep ratios to dense."""

    ms: dict[str, list[float]] = field(default_factory=dict)

    def median(self, variant: str) -> float:
        return statistics.median(self.ms[variant])

    def ratio(self, variant: str, over: str = "dense") -> float:
        return statistics.median(v / d for v, d in zip(self.ms[variant], self.ms[over]))

    def ratio_range(self, variant: str) -> tuple[float, float]:
        ratios = [v / d for v, d in zip(self.ms[variant], self.ms["dense"])]
        return min(ratios), max(ratios)

    def to_dict(self) -> dict:
        out = {"samples_ms": self.ms, "median_ms": {k: self.median(k) for k in self.ms}}
        out["ratio_to_dense"] = {k: self.ratio(k) for k in self.ms if k != "dense"}
        # Noise on a shared machine only ever adds time: the ratio of the fastest rounds is a cross-check.
        out["ratio_of_min"] = {k: min(self.ms[k]) / min(self.ms["dense"]) for k in self.ms if k != "dense"}
        return out


@dataclass
class Result:
    model: str
    input_shape: tuple[int, ...]
    batch: int
    dense_params: int = 0
    stored_params: int = 0
    transform_s: list[float] = field(default_factory=list)
    frozen_rel_diff: float = float("nan")  # max |frozen - transformed eval| / max |out|: should be ~0
    train: Timing | None = None
    forward: Timing | None = None
    train_compiled: Timing | None = None  # one loop: dense, nesc, and both under torch.compile
    forward_compiled: Timing | None = None  # one loop: dense, frozen, and both under torch.compile
    compile_s: dict[str, float] = field(default_factory=dict)  # variant -> first (compiling) call, seconds
    graph_breaks: dict[str, int] = field(default_factory=dict)  # "nesc train" / "frozen" -> torch._dynamo.explain
    # nesc::regenerate calls in one call of the frozen model compiled with freezing (0: folded at compile time)
    freezing_regenerate_calls: int | None = None
    error: str | None = None

    @property
    def achieved(self) -> float:
        return self.dense_params / max(self.stored_params, 1)

    def target(self) -> str:
        if self.model not in TARGET_MODELS:
            return "-"
        if self.error or self.train is None or self.forward is None:
            return "no (failed)"
        train, fwd = TARGETS[self.model]
        misses = []
        if self.train.ratio("nesc") > train:
            misses.append(f"train {self.train.ratio('nesc'):.2f}x > {train}x")
        if self.forward.ratio("nesc") > fwd:
            misses.append(f"fwd {self.forward.ratio('nesc'):.2f}x > {fwd}x")
        return "yes" if not misses else "no: " + ", ".join(misses)

    def compiled_target(self) -> str:
        if self.forward_compiled is None or self.train_compiled is None:
            return "-"
        over = self.forward_compiled.ratio("frozen_compiled", "dense_compiled")
        frozen = self.forward_compiled.ratio("frozen_freezing", "dense_freezing")
        faster = self.train_compiled.ratio("nesc_compiled", "nesc")
        return (f"compiled frozen / compiled dense {over:.2f}x in the default mode, {frozen:.2f}x with inductor "
                f"freezing (target <= {TARGET_COMPILED}x: default {'met' if over <= TARGET_COMPILED else 'missed'}, "
                f"freezing {'met' if frozen <= TARGET_COMPILED else 'missed'}); compiled / eager nesc training "
                f"{faster:.2f}x "
                f"(target < 1: {'met' if faster < 1 else 'missed'}); graph breaks {self.graph_breaks}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict() if self.train else None
        d["forward"] = self.forward.to_dict() if self.forward else None
        for k in ("train_compiled", "forward_compiled"):
            d[k] = getattr(self, k).to_dict() if getattr(self, k) else None
        d["ratio_achieved"] = self.achieved
        d["transform_median_s"] = statistics.median(self.transform_s) if self.transform_s else None
        d["target_met"] = self.target()
        return d


# ---------------------------------------------------------------------------------------------- timing


def _clock(fn: Callable[[], None]) -> float:
    """Wall milliseconds of one call (CPU ops are synchronous)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict[str, Callable[[], None]], s: Settings, progress: Progress, label: str) -> Timing:
    """Time every variant once per round, rotating which goes first, after ``s.warmup`` untimed rounds.

    Rounds are capped so that one measurement spends about ``s.measure_budget_s`` (estimated from the
    last warm-up round), but never fewer than ``s.min_reps``: slow models get fewer, not useless, samples.
    """
    names = list(fns)
    task = progress.add_task(label, total=s.warmup + s.reps)
    timing = Timing({n: [] for n in names})

    def one_round(r: int) -> float:
        shift = r % len(names)
        spent = 0.0
        for name in names[shift:] + names[:shift]:
            ms = _clock(fns[name])
            spent += ms
            if r >= s.warmup:
                timing.ms[name].append(ms)
        progress.advance(task)
        return spent / 1e3

    round_s = 0.0
    for r in range(s.warmup):
        round_s = one_round(r)
    reps = s.reps if not round_s else max(s.min_reps, min(s.reps, int(s.measure_budget_s / round_s)))
    progress.update(task, total=s.warmup + reps)
    for r in range(s.warmup, s.warmup + reps):
        one_round(r)
    progress.remove_task(task)
    return timing


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


# ------------------------------------------------------------------------------------------- one model


def bench_model(name: str, s: Settings, progress: Progress) -> Result:
    spec = get_spec(name)
    shape = spec.test_input_shape if s.test_size else spec.input_shape
    res = Result(name, shape, s.batch_for(shape))
    torch.manual_seed(0)
    model = spec.create()
    example = spec.example_inputs(2, test=s.test_size)
    res.dense_params = sum(p.numel() for p in model.parameters())

    # Transform: at least one run, more while within the time budget.
    task = progress.add_task(f"{name}: transform", total=s.transform_reps)
    gm = None
    for _ in range(s.transform_reps):
        if res.transform_s and sum(res.transform_s) > s.transform_budget_s:
            break
        t0 = time.perf_counter()
        gm = nesc.transform(model, example, ratio=s.ratio)
        res.transform_s.append(time.perf_counter() - t0)
        progress.advance(task)
    progress.remove_task(task)

    frozen = nesc.freeze(gm)
    res.stored_params = nesc.stored_params(frozen)

    x = spec.example_inputs(res.batch, test=s.test_size, seed=1)[0]
    y = spec.make_targets(res.batch, seed=1)
    with torch.no_grad():
        out = gm.eval()(x)
        res.frozen_rel_diff = float((out - frozen(x)).abs().max() / out.abs().max().clamp_min(1e-30))

    # Training: separate copies so SGD on one never touches the other (or the frozen model).
    dense_t, gm_t = copy.deepcopy(model), copy.deepcopy(gm)
    res.train = interleaved(
        {"dense": train_step(dense_t, x, y, s.lr), "nesc": train_step(gm_t, x, y, s.lr)},
        s, progress, f"{name}: train step (batch {res.batch})",
    )
    del dense_t, gm_t
    res.forward = interleaved(
        {"dense": forward(model, x), "nesc": forward(gm, x), "frozen": forward(frozen, x)},
        s, progress, f"{name}: forward (batch {res.batch})",
    )
    if name in s.compile:
        compiled(res, model, gm, frozen, x, y, s, progress)
    return res


def _regenerate_calls(fn: Callable[[], None]) -> int:
    """How many times one call of ``fn`` runs ``nesc::regenerate`` (torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "nesc::regenerate")


class Freezing(nn.Module):
    """``torch.compile(module)`` called under ``torch._inductor.config.patch(freezing=True)``: the flag
    must be set when inductor compiles, which is at a call (the first, or a recompilation);
    ``torch.compile(..., options={"freezing": True})`` does not apply it (measured: the frozen model's
    ``nesc::regenerate`` still ran in every call)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, *args):
        import torch._inductor.config

        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args)


def compiled(res: Result, model: nn.Module, gm: nn.Module, frozen: nn.Module, x, y, s: Settings, progress) -> None:
    """The same measurements under ``torch.compile`` (default mode): the first call of each compiled
    variant is timed as its compile time; graph breaks of the nesc training forward and the frozen one."""
    import torch._dynamo

    res.graph_breaks = {"nesc train": torch._dynamo.explain(gm.train())(x).graph_break_count,
                        "frozen": torch._dynamo.explain(frozen.eval())(x).graph_break_count}
    dense_t, gm_t = copy.deepcopy(model), copy.deepcopy(gm)
    train = {"dense": train_step(dense_t, x, y, s.lr), "nesc": train_step(gm_t, x, y, s.lr),
             "dense_compiled": train_step(torch.compile(copy.deepcopy(model)), x, y, s.lr),
             "nesc_compiled": train_step(torch.compile(copy.deepcopy(gm)), x, y, s.lr)}
    # Inductor's freezing (inference under no_grad) treats the parameters as constants and folds what
    # depends on them alone: the frozen model's weight regeneration runs once, at compile time, as a
    # deployment would have it.
    fwd = {"dense": forward(model, x), "frozen": forward(frozen, x),
           "dense_compiled": forward(torch.compile(model), x), "frozen_compiled": forward(torch.compile(frozen), x),
           "dense_freezing": forward(Freezing(copy.deepcopy(model)), x),
           "frozen_freezing": forward(Freezing(copy.deepcopy(frozen)), x)}
    for label, fns in (("train", train), ("forward", fwd)):
        for v in (("dense_compiled", "nesc_compiled") if label == "train" else
                  ("dense_compiled", "frozen_compiled", "dense_freezing", "frozen_freezing")):
            res.compile_s[f"{label} {v}"] = _clock(fns[v]) / 1e3
    res.freezing_regenerate_calls = _regenerate_calls(fwd["frozen_freezing"])
    res.train_compiled = interleaved(train, s, progress, f"{res.model}: compiled train")
    res.forward_compiled = interleaved(fwd, s, progress, f"{res.model}: compiled forward")


# ------------------------------------------------------------------------------------------ machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_facts() -> dict:
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "nesc": nesc.__version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "loadavg_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------------------------- output


COLUMNS = (
    "model", "input", "batch", "params dense", "stored", "ratio achieved", "transform s",
    "train ms dense", "train ms nesc", "train ratio", "fwd ms dense", "fwd ms nesc", "fwd ratio",
    "frozen fwd ratio", "target met?",
)
ALIGN = ("---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "---")
# A measurement whose per-round ratios spread wider than this (max/min) is flagged as noisy.
NOISY_SPREAD = 1.5


def markdown(facts: dict, s: Settings, results: list[Result]) -> str:
    env = ", ".join(f"{k}={v}" for k, v in facts["env"].items())
    timing = (
        f"{s.warmup} warm-up + {s.reps} interleaved rounds (fewer, >= {s.min_reps}, where a measurement "
        f"would exceed ~{s.measure_budget_s:g} s; n in the table), median"
    )
    lines = [
        "# nesc core benchmark",
        "",
        "Produced by:",
        "",
        "```",
        facts["command"],
        "```",
        "",
        (f"- date {facts['date']}; nesc {facts['nesc']} (git {facts['git']}); torch {facts['torch']}; "
         f"python {facts['python']}"),
        f"- CPU: {facts['cpu']}, {facts['cpu_count']} cores visible; torch threads {facts['torch_threads']}; {env}",
        (f"- load average (1/5/15 min): {_load(facts['loadavg_start'])} at start, {_load(facts['loadavg_end'])} "
         f"at end. Above the core count, other processes shared the CPU: absolute ms are inflated, the "
         f"interleaved ratios much less so"),
        (f"- ratio requested {s.ratio:g}; batch {s.batch}, and {s.large_batch} for inputs with a side >= "
         f"{s.large_side} (the 224x224 models); {'test' if s.test_size else 'canonical'} input sizes"),
        (f"- timing: {timing}; denormals {'flushed to zero' if facts['flush_denormal'] else 'kept'}; regenerated-weight "
         f"cache {'on' if facts.get('weight_cache', True) else 'off (--no-cache)'} in inference; transform: "
         f"median of up to {s.transform_reps} runs (no new run after {s.transform_budget_s:g} s); "
         f"wall time {facts['wall_s']:.0f} s"),
        ("- train step = forward + cross-entropy + backward + SGD step, train mode; forward = eval mode, "
         "no_grad. *nesc* is the transformed, trainable GraphModule (it regenerates every weight from its "
         "pool on each call); *frozen* is `nesc.freeze(gm)`. Ratios are nesc/dense: the median of the "
         "per-round ratios."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(ALIGN) + "|",
    ]
    lines += [_row(r) for r in results]
    lines += [
        "",
        ("Targets (the speed issue), checked in the last column: at 4x compression, training step and forward "
         "over dense at most " + ", ".join(f"{m} {t}x / {f}x" for m, (t, f) in TARGETS.items()) + "."),
    ]
    lines += [f"- {r.model}: {r.target()}" for r in results if r.model in TARGET_MODELS]
    comp = [r for r in results if r.forward_compiled is not None]
    if comp:
        lines += ["", f"torch.compile (default mode, and for the forward also with inductor freezing, "
                      f"torch._inductor.config.patch(freezing=True); the first call of a variant is its compile time): ms "
                      f"median, one loop per row with the eager variants; target: compiled frozen forward "
                      f"<= {TARGET_COMPILED}x compiled dense, compiled nesc training faster than eager.", "",
                  "| model | train ms dense / nesc / dense compiled / nesc compiled | fwd ms dense / frozen / "
                  "dense compiled / frozen compiled / dense freezing / frozen freezing | compile s | graph breaks "
                  "| nesc::regenerate calls per frozen-freezing forward |",
                  "|---|--:|--:|---|---|--:|"]
        for r in comp:
            t, f = r.train_compiled, r.forward_compiled
            lines.append(f"| {r.model} | " + " / ".join(f"{t.median(v):.1f}" for v in t.ms) + " | "
                         + " / ".join(f"{f.median(v):.1f}" for v in f.ms) + " | "
                         + ", ".join(f"{k} {v:.0f}" for k, v in r.compile_s.items()) + f" | {r.graph_breaks} "
                         f"| {r.freezing_regenerate_calls} |")
        lines += [""] + [f"- {r.model}: {r.compiled_target()}" for r in comp]
    notes = _notes(results)
    if notes:
        lines += ["", "Flags:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _row(r: Result) -> str:
    shape = "x".join(map(str, r.input_shape))
    if r.error:
        cells = [r.model, shape, str(r.batch), f"{r.dense_params:,}"] + [""] * 10
        return "| " + " | ".join(cells) + f" | error: {r.error.strip().splitlines()[-1][:160]} |"
    t, f = r.train, r.forward
    cells = [
        r.model, shape, str(r.batch), f"{r.dense_params:,}", f"{r.stored_params:,}", f"{r.achieved:.2f}x",
        f"{statistics.median(r.transform_s):.1f} (n={len(r.transform_s)})",
        f"{t.median('dense'):.1f}", f"{t.median('nesc'):.1f}", f"**{t.ratio('nesc'):.2f}x** (n={len(t.ms['dense'])})",
        f"{f.median('dense'):.1f}", f"{f.median('nesc'):.1f}", f"**{f.ratio('nesc'):.2f}x** (n={len(f.ms['dense'])})",
        f"{f.ratio('frozen'):.2f}x", r.target(),
    ]
    return "| " + " | ".join(cells) + " |"


def _notes(results: list[Result]) -> list[str]:
    """Measurements not to trust blindly: noisy ratios, frozen outputs that drift from the trained graph."""
    notes = []
    for r in results:
        if r.error:
            continue
        for what, timing in (("train", r.train), ("forward", r.forward)):
            lo, hi = timing.ratio_range("nesc")
            if hi / lo > NOISY_SPREAD:
                notes.append(f"{r.model} {what}: per-round ratios range {lo:.2f}x-{hi:.2f}x (noisy machine?)")
        if r.frozen_rel_diff > 1e-4:
            notes.append(f"{r.model}: frozen output differs from the transformed model's eval output "
                         f"(max |diff| / max |out| = {r.frozen_rel_diff:.1e})")
    return notes


def _summary_line(r: Result) -> str:
    if r.error:
        return f"{r.model}: failed"
    return (f"{r.model}: {r.achieved:.2f}x smaller, transform {statistics.median(r.transform_s):.1f} s, "
            f"train {r.train.ratio('nesc'):.2f}x, forward {r.forward.ratio('nesc'):.2f}x, "
            f"frozen forward {r.forward.ratio('frozen'):.2f}x dense")


def _load(avg) -> str:
    return "/".join(f"{v:.1f}" for v in avg)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated registry names (default: every registered model)")
    p.add_argument("--ratio", type=float, default=4.0, help="compression ratio passed to nesc.transform (default 4)")
    p.add_argument("--reps", type=int, default=7, help="timed, interleaved repetitions per measurement (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2)")
    p.add_argument("--measure-budget-s", type=float, default=60.0,
                   help="cap the timed rounds of one measurement at about this many seconds (default 60) ...")
    p.add_argument("--min-reps", type=int, default=3, help="... but time at least this many rounds (default 3)")
    p.add_argument("--transform-reps", type=int, default=3, help="transform runs; the median is reported (default 3)")
    p.add_argument("--transform-budget-s", type=float, default=30.0,
                   help="stop repeating transform once this many seconds are spent (default 30; >= 1 run always)")
    p.add_argument("--batch", type=int, default=32, help="batch size for small inputs (default 32)")
    p.add_argument("--large-batch", type=int, default=8,
                   help="batch size for inputs with a side >= --large-side, e.g. 224x224 (default 8)")
    p.add_argument("--large-side", type=int, default=128, help="spatial side that counts as large (default 128)")
    p.add_argument("--test-size", action="store_true", help="use each model's reduced test_input_shape")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero (default: flush; see the module docstring)")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate of the timed step (default 1e-3)")
    p.add_argument("--compile", default="", help="comma-separated models also timed under torch.compile (default none)")
    p.add_argument("--no-cache", action="store_true",
                   help="switch the regenerated-weight cache off (inference regenerates every call)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    p.add_argument("--name", default="core", help="output file stem (default core)")
    args = p.parse_args(argv)
    if min(args.reps, args.transform_reps, args.min_reps, args.batch, args.large_batch) < 1 or args.warmup < 0:
        p.error("--reps, --transform-reps, --min-reps and batch sizes must be >= 1, --warmup >= 0")
    settings = Settings(args.ratio, args.reps, args.warmup, args.transform_reps, args.transform_budget_s,
                        args.batch, args.large_batch, args.large_side, args.test_size, args.lr,
                        args.measure_budget_s, min(args.min_reps, args.reps),
                        tuple(m for m in args.compile.split(",") if m))
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    nesc.weight_cache(not args.no_cache)
    names = model_names(args.models)
    facts = machine_facts()
    facts["flush_denormal"] = not args.keep_denormals
    facts["weight_cache"] = not args.no_cache
    t0 = time.perf_counter()

    def failed(name: str, error: str) -> Result:
        shape = input_shape(name, settings.test_size)
        return Result(name, shape, settings.batch_for(shape), error=error)

    def summary(r: Result) -> None:
        if not console.is_terminal:  # no live bars in a log file: one line per model instead
            console.print(_summary_line(r))

    results = run_models(names, lambda name, progress: bench_model(name, settings, progress), failed, summary)
    facts["wall_s"] = time.perf_counter() - t0
    facts["loadavg_end"] = os.getloadavg()

    return write_results(args.out / args.name, facts, settings, results, markdown(facts, settings, results))


def input_shape(name: str, test_size: bool) -> tuple[int, ...]:
    spec = get_spec(name)
    return spec.test_input_shape if test_size else spec.input_shape


def run_models(names: list[str], bench: Callable[[str, Progress], object], failed: Callable[[str, str], object],
               after: Callable[[object], None] | None = None) -> list:
    """``bench(name, progress)`` for every model under one progress display, in order. A model that
    raises becomes ``failed(name, traceback)`` (a result carrying the error, printed in red): one
    broken model must not lose the others' numbers. ``after(result)`` runs after each model."""
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("models", total=len(names))
        for name in names:
            try:
                results.append(bench(name, progress))
            except Exception:  # noqa: BLE001  reported in the result and on the console
                results.append(failed(name, traceback.format_exc()))
                console.print(f"[red]{name} failed:[/red] {results[-1].error.splitlines()[-1]}")
            progress.advance(overall)
            if after is not None:
                after(results[-1])
    return results


def model_names(models: str | None) -> list[str]:
    """``--models a,b`` (default: every registered model), checked now rather than after minutes of work."""
    names = models.split(",") if models else list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(list_models())}")
    return names


def write_results(stem: Path, facts: dict, settings, results: list, md: str) -> int:
    """``stem``.json (machine facts, settings, every result) and ``stem``.md (``md``); print ``md``.
    The exit code: 1 if any model failed, so a broken model fails the run after the others' numbers
    are saved."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": facts, "settings": asdict(settings), "results": [r.to_dict() for r in results]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
