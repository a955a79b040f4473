"""Plan search on Fashion-MNIST: ESNAC, embedding descent and random search versus the uniform plan.

    flock /tmp/nesc-bench.lock env OMP_NUM_THREADS=1 python benchmarks/bench_search.py            # the issue's set-up
    flock /tmp/nesc-bench.lock env OMP_NUM_THREADS=1 python benchmarks/bench_search.py --seeds 0 \
        --evaluations 40 --limit 2000 --final-limit 10000 --final-epochs 3                       # a reduced one

Three parts, each resumable (rerun the same command and it continues where it stopped):

1. ``search``: for every seed and strategy, ``nesc.search`` on ``resnet_fmnist`` at ``--ratio`` with
   ``--evaluations`` evaluations (each a ``--epochs`` distilled fine-tune on ``--limit`` train samples,
   a fifth of them held out for scoring; never the test split). The best reward after k evaluations is
   the curve. Run dirs under ``benchmarks/.runs/search/`` (not committed).
2. ``final``: the best plan of every (strategy, seed) and the uniform plan, each trained from the dense
   model with distillation for ``--final-epochs`` on ``--final-limit`` train samples, scored on the test
   split (mean +- std over seeds).
3. ``transfer``: ESNAC on ``mobilenetv2_fmnist`` with the LSTM embedding learned on ``resnet_fmnist``
   reused without retraining, versus ESNAC from scratch, ``--transfer-evaluations`` each.

Results: ``benchmarks/results/search.json`` (every number, the command, the load average, what has
not run yet), ``search.md`` (tables) and ``search.png`` (best reward versus evaluations).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import nesc
from nesc.core.files import atomic_write_bytes
from nesc.search import SearchConfig
from nesc.search.evaluate import DENSE_WEIGHTS
from nesc.search.plan import read_plan
from nesc.search.space import PlanSpace
from nesc.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / ".runs" / "search"
MODEL, TRANSFER_MODEL, DATASET = "resnet_fmnist", "mobilenetv2_fmnist", "fashion_mnist"
STRATEGIES = ("esnac", "embedding", "random")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--evaluations", type=int, default=40)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per evaluation")
    p.add_argument("--limit", type=int, default=2000, help="train samples the search sees (a fifth held out)")
    p.add_argument("--dense-epochs", type=int, default=5)
    p.add_argument("--final-epochs", type=int, default=3)
    p.add_argument("--final-limit", type=int, default=10000, help="train samples of the final training")
    p.add_argument("--transfer-evaluations", type=int, default=20)
    p.add_argument("--parts", nargs="+", default=["search", "final", "transfer"], choices=["search", "final", "transfer"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--note", default="", help="a remark recorded with the results (e.g. what an earlier call did)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    out = {"command": "python benchmarks/bench_search.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "settings": vars(args), "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    searches = {}
    if "search" in args.parts:
        for seed in args.seeds:  # seed by seed: a run cut short still covers every strategy
            for strategy in args.strategies:
                searches[f"{strategy}-s{seed}"] = _search(args, MODEL, strategy, seed, args.evaluations)
                _write(out, searches, {}, {}, args)
    final = _final(args, searches) if "final" in args.parts else {}
    _write(out, searches, final, {}, args)
    transfer = _transfer(args) if "transfer" in args.parts else {}
    _write(out, searches, final, transfer, args)
    return 0


def _config(args, strategy: str, seed: int, evaluations: int, **options) -> SearchConfig:
    return SearchConfig(strategy=strategy, evaluations=evaluations, ratio=args.ratio, seed=seed, epochs=args.epochs,
                        limit=args.limit, dense_epochs=args.dense_epochs, workers=args.workers, options=options)


def _search(args, model: str, strategy: str, seed: int, evaluations: int, tag: str = "", **options) -> dict:
    run_dir = SCRATCH / f"{model}-{strategy}{tag}-s{seed}"
    shared = SCRATCH / f"{model}-{args.strategies[0]}-s{seed}" / DENSE_WEIGHTS  # one dense teacher per seed
    init = shared if shared.is_file() and not (run_dir / DENSE_WEIGHTS).is_file() else None
    t0 = time.perf_counter()
    result = nesc.search(model, DATASET, run_dir, _config(args, strategy, seed, evaluations, **options), init=init)
    rewards = [r["reward"] for r in result.history]
    return {"model": model, "strategy": strategy, "seed": seed, "run_dir": str(run_dir.relative_to(HERE.parent)),
            "dense_heldout_acc": result.dense["acc"], "evaluations": len(rewards),
            "best_so_far": [max(rewards[: k + 1]) for k in range(len(rewards))],
            "best": result.best_record, "seconds_this_call": time.perf_counter() - t0,
            "eval_seconds_median": statistics.median(r["seconds"] for r in result.history) if rewards else None}


def _final(args, searches: dict) -> dict:
    """Train every best plan and the uniform plan for real; one JSON per (plan, seed) so it resumes."""
    out = {}
    for seed in args.seeds:
        plans = {"uniform": PlanSpace(MODEL, args.ratio).plan(PlanSpace(MODEL, args.ratio).uniform())}
        for strategy in args.strategies:
            best = SCRATCH / f"{MODEL}-{strategy}-s{seed}" / "best.json"
            if best.is_file():
                plans[strategy] = read_plan(best)
        for name, plan in plans.items():
            out[f"{name}-s{seed}"] = _train_final(args, name, plan, seed)
    return out


def _dense_full(args, seed: int):
    """The dense model trained on the final training set (the teacher and starting point of each plan)."""
    ds = nesc.data.load_dataset(DATASET, seed=seed, limit=args.final_limit)
    torch.manual_seed(seed)
    model = nesc.models.get_spec(MODEL).create()
    config = TrainConfig(epochs=args.final_epochs, batch_size=100, lr=0.003, optimizer="adamw", weight_decay=1e-4,
                         bn_recalibration=10, seed=seed, progress=False, device="cpu")
    result = fit(model, ds, config, out_dir=SCRATCH / f"final-dense-s{seed}")
    return ds, model, config, result


def _train_final(args, name: str, plan, seed: int) -> dict:
    path = SCRATCH / f"final-{name}-s{seed}-{plan.key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    ds, dense, config, dense_result = _dense_full(args, seed)
    student = nesc.models.get_spec(MODEL).create()
    student.load_state_dict(dense.state_dict())
    gm = nesc.transform(student, (ds.x_train[:2],), plan.nes_config())
    t0 = time.perf_counter()
    result = fit(gm, ds, config, teacher=dense)
    frozen = nesc.freeze(gm)
    _, acc = nesc.train.evaluate(frozen, ds)
    doc = {"plan": name, "seed": seed, "key": plan.key, "test_acc": acc, "params": nesc.stored_params(frozen),
           "dense_test_acc": dense_result.test_acc, "dense_params": sum(p.numel() for p in dense.parameters()),
           "train_acc_last": result.history[-1]["train_acc"], "seconds": time.perf_counter() - t0,
           "load": os.getloadavg()}
    atomic_write_bytes(path, json.dumps(doc).encode(), overwrite=True)
    return doc


def _transfer(args) -> dict:
    out = {}
    for seed in args.seeds:
        source = SCRATCH / f"{MODEL}-esnac-s{seed}" / "esnac_embedding.safetensors"
        if not source.is_file():
            continue
        out[f"scratch-s{seed}"] = _search(args, TRANSFER_MODEL, "esnac", seed, args.transfer_evaluations)
        out[f"transfer-s{seed}"] = _search(args, TRANSFER_MODEL, "esnac", seed, args.transfer_evaluations,
                                           tag="-transfer", embedding=str(source), retrain=False)
    return out


# ------------------------------------------------------------------------------------------ report


def _write(out: dict, searches: dict, final: dict, transfer: dict, args) -> None:
    planned = {f"{s}-s{seed}" for seed in args.seeds for s in args.strategies}
    doc = {**out, "load_after": os.getloadavg(), "searches": searches, "final": final, "transfer": transfer,
           "not_run": sorted(planned - set(searches)) + ([] if final or "final" not in args.parts else ["final"])}
    atomic_write_bytes(RESULTS / "search.json", json.dumps(doc, indent=1).encode(), overwrite=True)
    atomic_write_bytes(RESULTS / "search.md", _markdown(doc, args).encode(), overwrite=True)
    _plot(searches, transfer)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} (n={len(values)})"


def _markdown(doc: dict, args) -> str:
    lines = ["# Plan search on Fashion-MNIST (resnet_fmnist)", "", f"Command: `{doc['command']}`", "",
             f"Started {doc['started']}; load average before {doc['load_before']}, after {doc['load_after']} "
             f"(2 CPU cores shared with other work; one thread).", "",
             *([f"Note: {args.note}", ""] if args.note else []),
             f"Each evaluation: a {args.epochs}-epoch distilled fine-tune on {args.limit} Fashion-MNIST train samples "
             f"(a fifth held out for the reward), budget 1/{args.ratio:g} of the dense size.", "",
             "## Best reward after k evaluations (mean ± std over seeds)", "",
             "| strategy | k=5 | k=10 | k=20 | k=40 | last |", "|---|---|---|---|---|---|"]
    for s in args.strategies:
        runs = [v for v in doc["searches"].values() if v["strategy"] == s]
        cells = [_mean_std([r["best_so_far"][k - 1] for r in runs if len(r["best_so_far"]) >= k]) for k in (5, 10, 20, 40)]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {_mean_std([r['best_so_far'][-1] for r in runs])} |")
    lines += ["", f"## Best plan fully trained ({args.final_epochs} epochs on {args.final_limit} train samples, "
              "distilled from the dense model), test accuracy", "", "| plan | test acc | params |", "|---|---|---|"]
    for name in ("uniform", *args.strategies):
        rows = [v for v in doc["final"].values() if v["plan"] == name]
        params = sorted({r["params"] for r in rows})
        lines.append(f"| {name} | {_mean_std([r['test_acc'] for r in rows])} | {', '.join(map(str, params)) or '-'} |")
    dense = [v["dense_test_acc"] for v in doc["final"].values() if v["plan"] == "uniform"]
    lines.append(f"| dense | {_mean_std(dense)} | 77754 |")
    lines += ["", "## Transfer: ESNAC on mobilenetv2_fmnist, embedding from resnet_fmnist (not retrained) vs from scratch",
              "", "| run | best reward | evaluations |", "|---|---|---|"]
    for key, v in sorted(doc["transfer"].items()):
        lines.append(f"| {key} | {v['best_so_far'][-1]:.4f} | {v['evaluations']} |")
    lines += ["", f"Not run (yet): {', '.join(doc['not_run']) or 'nothing'}.", ""]
    return "\n".join(lines)


def _plot(searches: dict, transfer: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"esnac": "tab:blue", "embedding": "tab:orange", "random": "tab:green"}
    for v in searches.values():
        ax.plot(range(1, len(v["best_so_far"]) + 1), v["best_so_far"], color=colors[v["strategy"]],
                linestyle=("-", "--", ":")[v["seed"] % 3], label=f"{v['strategy']} (seed {v['seed']})")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best reward C(2-C) A/A_dense")
    ax.set_title("resnet_fmnist, Fashion-MNIST")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "search.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
