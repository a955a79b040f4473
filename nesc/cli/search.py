"""``nesc search``: search a registry model's compression plan; ``nesc compress --plan`` applies the result.

    nesc search resnet_fmnist --dataset fashion_mnist --strategy esnac --evaluations 40 --ratio 4 \
        --epochs 1 --run-dir runs/search --workers 2
    nesc compress resnet_fmnist --dataset fashion_mnist --plan runs/search/best.json --epochs 10

The search (``nesc.search``) scores each plan by a short distilled fine-tune on data held out from the
train split; everything lives under ``--run-dir`` (the history, a cache of evaluations, the best plan
as ``best.json``), and running the same command again resumes. ``--ray ADDRESS`` runs the evaluations
as tasks on a Ray cluster (``pip install 'nesc[search]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nesc.cli.common import has_width, model_spec
from nesc.cli.config import given_config_flags
from nesc.cli.output import emit_json
from nesc.core.config import NESConfig
from nesc.core.errors import InputError
from nesc.data import list_datasets
from nesc.models import ModelSpec
from nesc.search import STRATEGIES, SearchConfig, read_plan, search
from nesc.search.reward import REWARDS


def add_parser(commands) -> None:
    p = commands.add_parser(
        "search", help="search per-layer ratios, dense layers, shared pools and width under a budget",
        description="Search a registry model's compression plan (ESNAC, Architecture Compression's embedding "
                    "descent, random search, or the uniform plan) under a parameter budget; each plan is scored "
                    "by a short distilled fine-tune on held-out train data. Writes RUN_DIR/best.json for "
                    "`nesc compress MODEL --plan RUN_DIR/best.json`; a rerun resumes.")
    d = SearchConfig()
    p.add_argument("model", metavar="MODEL", help="a registry model name (`nesc models`)")
    p.add_argument("--dataset", required=True, choices=list_datasets(), help="search on this dataset's train split")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="folder with the dataset's files (Fashion-MNIST)")
    p.add_argument("--strategy", choices=STRATEGIES.names(), default=d.strategy, help=f"default {d.strategy}")
    p.add_argument("--evaluations", type=int, default=d.evaluations, metavar="N", help=f"plans to evaluate "
                   f"(default {d.evaluations})")
    p.add_argument("--ratio", type=float, default=d.ratio, metavar="R", help=f"budget: 1/R of the dense size "
                   f"(default {d.ratio:g})")
    p.add_argument("--reward", choices=REWARDS, default=d.reward, help="paper: ESNAC's C(2-C) A/A_dense; budget: "
                   "A/A_dense within the budget, else 0")
    p.add_argument("--epochs", type=int, default=d.epochs, metavar="E", help="fine-tune epochs per plan")
    p.add_argument("--dense-epochs", type=int, default=d.dense_epochs, metavar="E",
                   help="epochs of the dense teacher (without --init)")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT", help="a local dense checkpoint: no dense training")
    p.add_argument("--limit", type=int, metavar="N", help="search on a class-balanced subset of N train samples")
    p.add_argument("--holdout", type=float, default=d.holdout, metavar="F", help="share of it held out for scoring")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--widths", type=float, nargs="+", default=list(d.widths), metavar="W",
                   help="width multipliers to search (models with width_mult), e.g. 1 1.5 2")
    p.add_argument("--max-groups", type=int, default=d.max_groups, metavar="G", help="shared pools a plan may use")
    p.add_argument("--min-params", type=int, default=d.min_params, metavar="N", help="smaller weights are not searched")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-dir", type=Path, required=True, metavar="DIR", help="history, cache, best.json; reruns resume")
    p.add_argument("--workers", type=int, default=d.workers, metavar="K", help="evaluations at a time (processes)")
    p.add_argument("--ray", metavar="ADDRESS", help="run evaluations on this Ray cluster (e.g. auto, ray://host:10001)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (the history, the dense "
                   "result, best.json's path) and nothing else there (default: a table)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    spec = model_spec(args.model)
    if args.widths != [1.0] and not has_width(spec):
        raise InputError(f"--widths: model {spec.name} has no width multiplier; drop --widths")
    config = SearchConfig(strategy=args.strategy, evaluations=args.evaluations, ratio=args.ratio, reward=args.reward,
                          workers=args.workers, ray=args.ray, widths=tuple(args.widths), max_groups=args.max_groups,
                          min_params=args.min_params, seed=args.seed, epochs=args.epochs, limit=args.limit,
                          holdout=args.holdout, batch_size=args.batch_size, lr=args.lr, dense_epochs=args.dense_epochs,
                          data_dir=str(args.data_dir) if args.data_dir else None)
    err.print(f"searching {spec.name} on {args.dataset} ({args.strategy}, {args.evaluations} evaluations, ratio "
              f"{args.ratio:g}) -> {args.run_dir}")
    result = search(spec.name, args.dataset, args.run_dir, config, init=args.init, console=err)
    table = Table(title=f"{spec.name}: {len(result.history)} plans, dense held-out accuracy {result.dense['acc']:.2%}")
    for column in ("#", "held-out acc", "params", "reward", "seconds", ""):
        table.add_column(column, justify="right")
    best = result.best_record["index"] if result.best_record else None
    for r in result.history:
        params = f"{r['params']:,}" if r["params"] else "infeasible"
        table.add_row(str(r["index"]), f"{r['acc']:.2%}", params, f"{r['reward']:.4f}", f"{r['seconds']:.1f}",
                      "best" if r["index"] == best else ("cached" if r["cached"] else ""))
    out.print(table)
    if args.json:
        emit_json({"model": spec.name, "dataset": args.dataset, "run_dir": result.run_dir, "dense": result.dense,
                   "history": result.history, "best": result.best_record,
                   "best_plan": result.run_dir / "best.json" if result.best is not None else None})
    if result.best is None:
        out.print("no feasible plan was found; raise the ratio's budget or the evaluations")
        return 1
    out.print(f"best plan: {result.run_dir / 'best.json'} (nesc compress {spec.name} --dataset {args.dataset} "
              f"--plan {result.run_dir / 'best.json'})")
    return 0


def plan_config(args: argparse.Namespace, spec: ModelSpec, trained: bool) -> NESConfig:
    """``nesc compress --plan FILE``: the plan's NESConfig; its width goes to ``args.width``. The plan
    fixes the budget and every searched layer, so the NESConfig flags are refused with it."""
    given = given_config_flags(args)
    if given:
        raise InputError(f"--plan fixes the budget and the per-layer settings; drop {', '.join(given)}")
    plan = read_plan(args.plan)
    if plan.model != spec.name:
        raise InputError(f"--plan {args.plan} was searched for model {plan.model}, not {spec.name}; pass "
                         f"MODEL {plan.model} or the plan of {spec.name}")
    if plan.width != 1.0:
        if not trained:
            raise InputError(f"--plan {args.plan} is for {spec.name} at width {plan.width:g}, which has no dense "
                             f"weights to fit: add --dataset to train it")
        if args.width is not None and args.width != plan.width:
            raise InputError(f"--width {args.width:g} contradicts the plan's width {plan.width:g}; drop --width")
        args.width = plan.width
    return plan.nes_config(**({"init": "random"} if plan.width != 1.0 else {}))
