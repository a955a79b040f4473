"""Opt-in MetaSchedule tuning, with its records cached on disk and reused.

The default schedules need no tuning. ``tune=`` spends a budget of measured trials (or of seconds)
on the fused kernels of one model and one target; the records go to a JSON database under
``cache_dir/<target hash>/`` (default ``~/.cache/nesc/tvm``). A kernel that already has a record
there, from any earlier compile of any model, is not tuned again: a second compile of the same model
runs no trial and builds from the database. Only kernels with at least ``MIN_FLOP_SHARE`` of the
model's FLOPs are tuned; the others keep their default schedules.

MetaSchedule measures candidate kernels in worker processes and needs static shapes, so a tuned
model is built for the batch size of its example inputs. It needs psutil and cloudpickle (the
``tvm`` extra) and apache-tvm-ffi 0.1.14.post0 (0.1.15.post2 segfaults serialising IR); it uses
the XGBoost cost model when ``xgboost`` is installed (``pip install xgboost``), random picks otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from nesc.backends.tvm.adapter import import_tensor_intrinsics, relax, s_tir, tvm
from nesc.core.errors import ConfigError

DEFAULT_CACHE = Path("~/.cache/nesc/tvm")
# Trials per kernel and round when tuning for a time budget: the budget is checked between rounds.
ROUND_TRIALS = 8
# Kernels below this share of the model's FLOPs (reshapes, index arithmetic, small gathers) are left
# to the default schedules: a trial costs the same seconds whatever the kernel, and these gain nothing.
MIN_FLOP_SHARE = 0.01
# Seconds a worker may take to build or to run one candidate. MetaSchedule's 30 s default is too
# short on a busy 2-core machine: every worker process imports TVM (and torch, which tvm_ffi imports).
WORKER_TIMEOUT_S = 300


@dataclass(frozen=True)
class TuneConfig:
    """A MetaSchedule budget: ``trials`` measured candidates in all, or ``seconds`` of tuning (checked
    between rounds of ``ROUND_TRIALS`` trials per kernel, so a round may overrun it). Exactly one."""

    trials: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.trials is None) == (self.seconds is None):
            raise ConfigError(f"TuneConfig needs exactly one of trials or seconds; got trials={self.trials}, "
                              f"seconds={self.seconds}")
        if self.trials is not None and (isinstance(self.trials, bool) or not isinstance(self.trials, int)
                                        or self.trials < 1):
            raise ConfigError(f"TuneConfig.trials must be an int >= 1; got {self.trials!r}")
        if self.seconds is not None and not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise ConfigError(f"TuneConfig.seconds must be a number > 0; got {self.seconds!r}")


def as_tune_config(tune) -> TuneConfig | None:
    """``None`` -> no tuning; an int -> that many trials; ``"90s"`` -> 90 seconds; ``"64"`` -> 64 trials."""
    if tune is None or isinstance(tune, TuneConfig):
        return tune
    if isinstance(tune, int) and not isinstance(tune, bool):
        return TuneConfig(trials=tune)
    if isinstance(tune, str):
        text = tune.strip().lower()
        try:
            return TuneConfig(seconds=float(text[:-1])) if text.endswith("s") else TuneConfig(trials=int(text))
        except ValueError:
            pass
    raise ConfigError(f"tune must be None, a number of trials (64), a duration ('120s') or a TuneConfig; "
                      f"got {tune!r}")


@dataclass
class TuneReport:
    """What a tuning step did: kernels found, tuned now, already in the cache, too small to tune;
    trials run now; where the database is."""

    database: Path
    kernels: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    cost_model: str = ""
    trials: int = 0
    seconds: float = 0.0


def cache_folder(cache_dir: str | Path | None, target: tvm.target.Target) -> Path:
    """One database per target (its full description, CPU features included), under ``cache_dir``."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    key = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    return root / f"{target.kind.name}-{key}"


def tune_module(mod: tvm.IRModule, target: tvm.target.Target, config: TuneConfig,
                cache_dir: str | Path | None) -> tuple[tvm.IRModule, TuneReport]:
    """Legalize and fuse ``mod``, tune the kernels the cache has no record of, and apply the database:
    every kernel with a record comes back scheduled (``tirx.is_scheduled``); the rest is left for the
    default schedules."""
    ms = s_tir.meta_schedule
    import_tensor_intrinsics()  # before MetaSchedule imports them: 10 minutes otherwise, with torch loaded
    folder = cache_folder(cache_dir, target)
    with target:
        mod = relax.get_pipeline("zero")(mod)  # legalize + fuse, as MetaSchedule's relax pipeline does
    database = _database(folder)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    flops = {t.task_name: s_tir.analysis.estimate_tir_flops(t.dispatched[0]) * t.weight for t in tasks}
    total = sum(flops.values()) or 1.0
    big = [t for t in tasks if flops[t.task_name] >= MIN_FLOP_SHARE * total]
    # A workload the database knows was tuned by an earlier compile (with whatever budget it had).
    todo = [t for t in big if not database.has_workload(t.dispatched[0])]
    report = TuneReport(folder, kernels=[t.task_name for t in tasks], tuned=[t.task_name for t in todo],
                        reused=[t.task_name for t in big if t not in todo],
                        small=[t.task_name for t in tasks if t not in big])
    before, start = len(database), time.perf_counter()
    report.cost_model = cost_model()
    if todo:
        _run_budget(todo, folder, database, config, start, report.cost_model)
    report.trials, report.seconds = len(database) - before, time.perf_counter() - start
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, report


def _database(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    return s_tir.meta_schedule.database.JSONDatabase(
        path_workload=str(folder / "database_workload.json"),
        path_tuning_record=str(folder / "database_tuning_record.json"),
        allow_missing=True,
    )


def cost_model() -> str:
    """MetaSchedule's XGBoost cost model where xgboost is installed; otherwise candidates are picked
    at random among the evolutionary search's valid ones (fine for small budgets, worse for large)."""
    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def _run_budget(tasks: list, folder: Path, database, config: TuneConfig, start: float, model: str) -> None:
    ms = s_tir.meta_schedule
    workers = max(1, min(os.cpu_count() or 1, 4))
    while True:
        per_task = config.trials if config.trials is not None else ROUND_TRIALS
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(folder), num_threads=workers, seed=0)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(folder), database=database,
            max_trials_global=per_task * len(contexts) if config.trials is None else config.trials,
            max_trials_per_task=per_task, num_trials_per_iter=min(per_task, 64),
            # Each build worker imports the tensor intrinsics too (with torch loaded, via tvm_ffi).
            builder=ms.builder.LocalBuilder(max_workers=workers, timeout_sec=WORKER_TIMEOUT_S,
                                            initializer=import_tensor_intrinsics),
            runner=ms.runner.LocalRunner(timeout_sec=WORKER_TIMEOUT_S), cost_model=model,
        )
        if config.trials is not None or time.perf_counter() - start >= config.seconds:
            return
