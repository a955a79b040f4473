"""The experiment suite: accuracy versus compression for nesc and every baseline, at equal parameter count.

    python benchmarks/run_experiments.py                    # everything, 3 seeds (resumes; skips finished runs)
    python benchmarks/run_experiments.py --only fmnist --seeds 0 --tiny    # a quick check of the scripts
    python benchmarks/report_experiments.py                 # the table and plots from the result files

Experiments (grids below):

* ``fmnist``: Fashion-MNIST, ``resnet_fmnist`` and ``mobilenetv2_fmnist``: test accuracy at 1x (dense)
  and 2x, 4x, 8x, 16x for every method of ``nesc.baselines``.
* ``mnist1d``: MNIST-1D, ``cnn1d``: nesc versus WSNet-style fixed sampling at equal compression.
* ``sharing``: per-layer pools versus one pool per layer type versus one global pool across layer
  types (``policy``), equal budget, ``resnet_fmnist``.
* ``init``: nesc from scratch versus initialised from the trained dense model (least-squares pool
  fit) and distilled from it, ``resnet_fmnist`` and ``mobilenetv2_fmnist``.

Runs go seed by seed (all experiments for seed 0, then seed 1, ...) so that a suite cut short still
covers every experiment. Every run uses one thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exp_common import Run, Settings, safe_execute  # noqa: E402

FMNIST_MODELS = ("resnet_fmnist", "mobilenetv2_fmnist")
RATIOS = (2, 4, 8, 16)
FMNIST_METHODS = ("nesc", "nesc_fixed", "wsnet", "hashed", "prune", "thinner")
EXPERIMENTS = ("fmnist", "mnist1d", "sharing", "init")
TINY = Settings(epochs=1, limit=300, test_limit=300, epochs_1d=1)


def fmnist(seed: int, settings: Settings) -> list[Run]:
    runs = []
    for model in FMNIST_MODELS:
        runs.append(Run("fmnist", "fashion_mnist", model, "dense", 1, seed, settings.policy).dense())
        runs += [Run("fmnist", "fashion_mnist", model, m, r, seed, settings.policy)
                 for r in RATIOS for m in FMNIST_METHODS]
    return runs


def mnist1d(seed: int, settings: Settings) -> list[Run]:
    runs = [Run("mnist1d", "mnist1d", "cnn1d", "dense", 1, seed, settings.policy).dense()]
    return runs + [Run("mnist1d", "mnist1d", "cnn1d", m, r, seed, settings.policy)
                   for r in RATIOS for m in ("nesc", "wsnet")]


def sharing(seed: int, settings: Settings) -> list[Run]:
    # per_type is the fmnist grid's nesc; these add the other two policies at the same budgets.
    # resnet_fmnist only: mobilenetv2_fmnist's budget at 8x fits neither of the other two policies.
    return [Run("sharing", "fashion_mnist", "resnet_fmnist", "nesc", r, seed, policy)
            for r in (4, 8) for policy in ("per_layer", "global")]


def init(seed: int, settings: Settings) -> list[Run]:
    # from scratch is the fmnist grid's nesc; this adds dense-initialised + distilled at the same budgets.
    return [Run("init", "fashion_mnist", model, "nesc", r, seed, settings.policy, init="dense+distill")
            for model in FMNIST_MODELS for r in (4, 8)]


GRIDS = {"fmnist": fmnist, "mnist1d": mnist1d, "sharing": sharing, "init": init}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated experiments")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="1 epoch on 300 samples: checks the scripts only")
    parser.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results/experiments)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = TINY if args.tiny else Settings()
    if args.results is not None:
        _redirect(args.results)
    only = args.only.split(",")
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; valid: {', '.join(EXPERIMENTS)}")
    command = "python benchmarks/run_experiments.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.perf_counter()
    for seed in args.seeds:
        for name in only:
            for run in GRIDS[name](seed, settings):
                safe_execute(run, settings, command.strip(), log=_log(start))
    _log(start)(f"suite done: {dataclasses.asdict(settings)}")
    return 0


def _redirect(results: Path) -> None:
    import exp_common

    exp_common.RESULTS = results
    exp_common.RUNS = results / "runs"
    exp_common.SCRATCH = results / ".scratch"


def _log(start: float):
    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    return log


if __name__ == "__main__":
    sys.exit(main())
