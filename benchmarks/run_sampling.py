"""Learned versus fixed sampling, WSNet, and wide-at-equal-size, on real data (3 seeds, resumable).

    python benchmarks/run_sampling.py                      # both grids, seeds 0 1 2; skips finished runs
    python benchmarks/run_sampling.py --only mnist1d       # one grid
    python benchmarks/run_sampling.py --report             # tables and plots from the result files only
    python benchmarks/run_sampling.py --only fmnist_full --variants reuse_outputs --seeds 0 1   # some cells

Grids (every run: ``exp_common.execute``, one JSON per run under ``benchmarks/results/sampling/runs/``,
per-epoch checkpoints under ``benchmarks/.runs/`` so an interrupted run resumes at its last epoch):

* ``mnist1d``: MNIST-1D, ``cnn1d``, 10 epochs on the whole train split, at 4x, 8x, 16x: nesc (learned
  starts), ``nesc_fixed`` (its random initial starts frozen: the standing control), WSNet as published
  (``wsnet``), and nesc variants (``exp_common.VARIANTS``): ``anneal`` (sampling kernel half-width
  3 -> 1 over the first half, starts lr 0.01), ``extent4`` (pools 4 cells longer than the kernel
  along time, learned and fixed), ``learner`` (the transformation learner), ``spread`` (the pool fit
  rescaled to the dense init's spread), ``reuse`` (``NESConfig(reuse=True)``: routing whose input
  channels fold after freeze, ``passes.reuse``), ``reuse_outputs`` (``reuse="outputs"``: also one input
  routing per layer, so freeze shares each layer's products); and ``wide2``: a 2x-wide cnn1d compressed to the dense cnn1d's
  parameter count (learned and fixed), against the dense cnn1d.
* ``fmnist_full``: the whole Fashion-MNIST train split (60,000 images, 5 epochs), test on all 10,000:
  ``resnet_fmnist`` and ``mobilenetv2_fmnist``: dense, nesc 4x and 8x, nesc_fixed 4x, WSNet 4x,
  the 2x-wide model at the dense size, and nesc 4x with ``reuse=True`` and ``reuse="outputs"``. 2-4 CPU-thread minutes per run.

Runs go seed by seed, MNIST-1D first, so a suite cut short still covers every configuration once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exp_common  # noqa: E402
from exp_common import Run, Settings, safe_execute  # noqa: E402

RESULTS = exp_common.HERE / "results" / "sampling"
RATIOS_1D = (4, 8, 16)
# (method, variant) of the MNIST-1D grid at every ratio.
CELLS_1D = (("nesc", ""), ("nesc_fixed", ""), ("wsnet", ""), ("nesc", "anneal"), ("nesc", "extent4"),
            ("nesc_fixed", "extent4"), ("nesc", "learner"), ("nesc", "spread"), ("nesc", "reuse"))
FMNIST_MODELS = ("resnet_fmnist", "mobilenetv2_fmnist")
CELLS_FMNIST = (("nesc", "", 4), ("nesc_fixed", "", 4), ("wsnet", "", 4), ("nesc", "", 8), ("nesc", "wide2", 1),
                ("nesc", "reuse", 4), ("nesc", "reuse_outputs", 4))
GRIDS = ("mnist1d", "fmnist_full")


def mnist1d(seed: int) -> list[Run]:
    runs = [Run("mnist1d", "mnist1d", "cnn1d", "dense", 1, seed).dense()]
    runs += [Run("mnist1d", "mnist1d", "cnn1d", m, r, seed, variant=v) for r in RATIOS_1D for m, v in CELLS_1D]
    # ratio 1: the wide model stores as many parameters as the dense narrow one.
    return runs + [Run("mnist1d", "mnist1d", "cnn1d", m, 1, seed, variant="wide2") for m in ("nesc", "nesc_fixed")]


def fmnist_full(seed: int) -> list[Run]:
    runs = []
    for model in FMNIST_MODELS:
        runs.append(Run("fmnist_full", "fashion_mnist_full", model, "dense", 1, seed).dense())
        runs += [Run("fmnist_full", "fashion_mnist_full", model, m, r, seed, variant=v) for m, v, r in CELLS_FMNIST]
    return runs


def grid(name: str, seed: int) -> list[Run]:
    return {"mnist1d": mnist1d, "fmnist_full": fmnist_full}[name](seed)


def use_results_folder(results: Path = RESULTS) -> None:
    exp_common.RESULTS = results
    exp_common.RUNS = results / "runs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GRIDS), help=f"comma-separated grids ({', '.join(GRIDS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", help="comma-separated variants to run (exp_common.VARIANTS; 'base' for none, "
                                           "'dense' for the dense baselines); default all")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots")
    args = parser.parse_args(argv)
    use_results_folder()
    if args.report:
        import report_sampling

        return report_sampling.main()
    only = args.only.split(",")
    unknown = sorted(set(only) - set(GRIDS))
    if unknown:
        parser.error(f"unknown grids {unknown}; valid: {', '.join(GRIDS)}")
    torch.set_num_threads(1)
    settings = Settings()
    command = "python benchmarks/run_sampling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    wanted = None if args.variants is None else set(args.variants.split(","))
    if wanted is not None and wanted - set(exp_common.VARIANTS) - {"base", "dense"}:
        parser.error(f"unknown variants {sorted(wanted - set(exp_common.VARIANTS) - {'base', 'dense'})}; "
                     f"valid: base, dense, {', '.join(v for v in exp_common.VARIANTS if v)}")
    for seed in args.seeds:
        for name in only:
            for run in grid(name, seed):
                kind = "dense" if run.method == "dense" else run.variant or "base"
                if wanted is None or kind in wanted:
                    safe_execute(run, settings, command.strip(), log=log)
    log("suite done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
