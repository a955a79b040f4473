"""The search loop: propose, evaluate (cached, in parallel), record, resume.

Run dir layout (every file written atomically; every file read back is validated):

    search.json        what the search is (model, dataset, budget, strategy, evaluation settings);
                       a second run with other settings in the same dir is refused
    dense/, dense.*    the dense teacher (``evaluate.prepare_dense``)
    evals/<key>.json   one evaluation's result, keyed by the plan's hash: nothing trains twice
    history.json       every evaluation in order (genome, plan key, accuracy, size, reward) and the
                       number of proposal rounds: the whole state of the search
    best.json          the best plan so far (``nesc compress MODEL --plan best.json``)

Strategies are deterministic given the history and the round number, so an interrupted search
continues exactly: the interrupted round is proposed again and its finished evaluations are cache hits.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nesc.checkpoint import prepare_run_dir
from nesc.core.config import checked_fields, replace_fields
from nesc.core.errors import ArtifactError, CheckpointError, ConfigError
from nesc.core.files import atomic_write_bytes

from .evaluate import EvalSettings, evaluate_plan, prepare_dense
from .plan import Plan
from .reward import REWARDS, reward
from .space import Genome, PlanSpace
from .strategies import STRATEGIES, Observation
from .workers import executor

HISTORY, BEST, SETTINGS, EVALS = "history.json", "best.json", "search.json", "evals"
MAX_STALLS = 5  # rounds in a row without a new plan end the search (the space, or the strategy, is exhausted)


@checked_fields
@dataclass(frozen=True)
class SearchConfig:
    """A search. strategy: a name in ``STRATEGIES`` (esnac, embedding, random, uniform), with
    ``options`` for its constructor; evaluations: how many plans to evaluate; ratio: the budget, a
    share of the width-1 dense size; reward: ``paper`` (ESNAC's) or ``budget`` (hard budget); workers:
    evaluations at a time (local processes, or Ray tasks with ``ray``); widths: width multipliers to
    search; max_groups: shared pools a plan may have; min_params: smaller weights are not searched.
    The rest is how each plan is evaluated (``evaluate.EvalSettings``)."""

    strategy: str = "esnac"
    evaluations: int = 20
    ratio: float = 4.0
    reward: str = "paper"
    workers: int = 1
    ray: str | None = None
    widths: tuple[float, ...] = (1.0,)
    max_groups: int = 2
    min_params: int = 1024
    seed: int = 0
    epochs: int = 1
    limit: int | None = None
    holdout: float = 0.2
    batch_size: int = 64
    lr: float = 0.003
    dense_epochs: int = 5
    data_dir: str | None = None
    progress: bool | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown search strategy {self.strategy!r}; valid: {', '.join(STRATEGIES.names())}")
        if not (isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool) and 1 < self.ratio < math.inf):
            raise ConfigError(f"SearchConfig.ratio must be a finite number > 1 (the budget is 1/ratio of the dense "
                              f"size), got {self.ratio!r}")
        if not self.widths or any(not (isinstance(w, (int, float)) and 0 < w <= 16) for w in self.widths):
            raise ConfigError(f"SearchConfig.widths must be width multipliers in (0, 16], got {self.widths!r}")
        if isinstance(self.max_groups, bool) or not isinstance(self.max_groups, int) or self.max_groups < 0:
            raise ConfigError(f"SearchConfig.max_groups must be an int >= 0, got {self.max_groups!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"SearchConfig.options must be a dict of strategy options, got {self.options!r}")
        for name in ("evaluations", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SearchConfig.{name} must be an int >= 1, got {value!r}")
        if self.reward not in REWARDS:
            raise ConfigError(f"SearchConfig.reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        object.__setattr__(self, "widths", tuple(float(w) for w in self.widths))

    def replace(self, **changes) -> SearchConfig:
        return replace_fields(self, changes)

    def settings(self, model: str, dataset: str) -> EvalSettings:
        return EvalSettings(model, dataset, epochs=self.epochs, limit=self.limit, holdout=self.holdout,
                            batch_size=self.batch_size, lr=self.lr, dense_epochs=self.dense_epochs, seed=self.seed,
                            data_dir=self.data_dir)

    def identity(self, model: str, dataset: str) -> dict:
        """What a run dir's results depend on (not: how many evaluations, where they run, progress)."""
        return {"settings": self.settings(model, dataset).to_json(), "strategy": self.strategy, "ratio": self.ratio,
                "reward": self.reward, "widths": list(self.widths), "max_groups": self.max_groups,
                "min_params": self.min_params, "options": {k: str(v) for k, v in sorted(self.options.items())}}


@dataclass
class SearchResult:
    best: Plan | None  # None when no evaluated plan was feasible
    best_record: dict | None
    history: list[dict]
    dense: dict  # {"acc": held-out accuracy, "params": dense size}
    run_dir: Path


def search(model: str, dataset: str, run_dir: str | Path, config: SearchConfig | None = None, *,
           init: str | Path | None = None, console: Console | None = None, **changes) -> SearchResult:
    """Search ``model``'s plan space on ``dataset`` (see ``SearchConfig``; keyword ``changes`` edit it).

    ``init``: a local dense checkpoint instead of training the dense model. Returns the best plan
    (also in ``run_dir/best.json``) and the history; calling again with the same ``run_dir`` resumes.
    """
    config = (config or SearchConfig()).replace(**changes) if changes else (config or SearchConfig())
    out = prepare_run_dir(run_dir)
    settings = config.settings(model, dataset)
    _check_identity(out, config.identity(model, dataset))
    dense = prepare_dense(settings, out, Path(init) if init is not None else None)
    data = _input_shape(settings)
    space = PlanSpace(model, config.ratio, num_classes=data[0], input_shape=data[1], widths=config.widths,
                      max_groups=config.max_groups, min_params=config.min_params)
    strategy = STRATEGIES.get(config.strategy)(**config.options)
    history, rounds = read_history(out, space)
    (out / EVALS).mkdir(exist_ok=True)
    pool = executor(config.workers, config.ray)
    try:
        with _progress(config, console) as bar:
            task = bar.add_task("search", total=config.evaluations, completed=min(len(history), config.evaluations),
                                best=_best_text(history))
            stalls = 0
            while len(history) < config.evaluations and stalls < MAX_STALLS:
                rng = random.Random(config.seed * 1_000_003 + rounds)
                n = min(config.workers, config.evaluations - len(history))
                observations = [_observation(r, space) for r in history]
                genomes = strategy.propose(space, observations, n, rng)[:n]
                rounds += 1
                seen = {r["key"] for r in history}
                plans = _distinct([(g, space.plan(g)) for g in genomes], seen)
                stalls = 0 if plans else stalls + 1
                for genome, plan, result in _evaluate(pool, plans, settings, out):
                    history.append(_record(len(history), genome, plan, result, dense, space, config.reward))
                    bar.update(task, completed=len(history), best=_best_text(history))
                write_history(out, history, rounds)
    finally:
        pool.close()
    best = max((r for r in history if r["feasible"]), key=lambda r: r["reward"], default=None)
    best_plan = space.plan(Genome.from_json(best["genome"])) if best else None
    if best_plan is not None:
        best_plan.save(out / BEST)
    if hasattr(strategy, "export") and len(history) >= 2:
        _save_embedding(out, strategy.export(space, [_observation(r, space) for r in history], config.seed))
    return SearchResult(best_plan, best, history, dense, out)


def _input_shape(settings: EvalSettings) -> tuple[int, tuple[int, ...]]:
    from .evaluate import search_data

    spec = search_data(settings).spec
    return spec.num_classes, spec.input_shape


def _distinct(pairs: list[tuple[Genome, Plan]], seen: set[str]) -> list[tuple[Genome, Plan]]:
    out, keys = [], set(seen)
    for genome, plan in pairs:
        if plan.key not in keys:
            keys.add(plan.key)
            out.append((genome, plan))
    return out


def _evaluate(pool, plans, settings: EvalSettings, out: Path):
    """Yield (genome, plan, result) in proposal order; cached results are not recomputed."""
    futures: list[cf.Future] = []
    for _, plan in plans:
        cached = read_cached(out, plan)
        if cached is not None:
            done: cf.Future = cf.Future()
            done.set_result({**cached, "cached": True})
            futures.append(done)
        else:
            futures.append(pool.submit(evaluate_plan, settings.to_json(), plan.to_json(), str(out)))
    for (genome, plan), future in zip(plans, futures):
        result = future.result()
        if not result.pop("cached", False):
            write_cached(out, plan, result)
            result["cached"] = False
        else:
            result["cached"] = True
        yield genome, plan, result


def _record(index: int, genome: Genome, plan: Plan, result: dict, dense: dict, space: PlanSpace, kind: str) -> dict:
    score = 0.0
    if result["feasible"]:
        score = reward(kind, result["acc"], result["params"], dense["acc"], space.dense_params, space.budget)
    return {"index": index, "key": plan.key, "genome": genome.to_json(), "acc": result["acc"],
            "params": result["params"], "reward": score, "feasible": result["feasible"],
            "seconds": result["seconds"], "cached": result["cached"], "error": result.get("error")}


def _observation(record: dict, space: PlanSpace) -> Observation:
    size = (record["params"] / space.budget) if record["params"] else 1.0
    return Observation(Genome.from_json(record["genome"]), record["reward"], size)


# ------------------------------------------------------------------------------------------ files


def _check_identity(out: Path, identity: dict) -> None:
    path = out / SETTINGS
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable ({e}); use another --run-dir") from None
        if saved != identity:
            diff = sorted(k for k in identity if saved.get(k) != identity[k]) if isinstance(saved, dict) else ["all"]
            raise CheckpointError(f"run dir {str(out)!r} holds a search with other settings ({', '.join(diff)} "
                                  f"differ); resume it with the same settings, or use another --run-dir")
        return
    atomic_write_bytes(path, json.dumps(identity, indent=1).encode(), what="search settings")


def cache_path(out: Path, plan: Plan) -> Path:
    return out / EVALS / f"{plan.key}.json"


def write_cached(out: Path, plan: Plan, result: dict) -> None:
    doc = {"plan": plan.canonical(), "result": result}
    atomic_write_bytes(cache_path(out, plan), json.dumps(doc).encode(), overwrite=True, what="evaluation")


def read_cached(out: Path, plan: Plan) -> dict | None:
    """The cached result of ``plan``, or None. A file that is not exactly this plan's is ignored."""
    path = cache_path(out, plan)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        result = doc["result"]
        ok = (doc["plan"] == plan.canonical() and isinstance(result["feasible"], bool)
              and isinstance(result["acc"], float) and isinstance(result["seconds"], float)
              and (result["params"] is None or isinstance(result["params"], int)))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    return dict(result) if ok else None


def write_history(out: Path, history: list[dict], rounds: int) -> None:
    doc = {"format": "nesc-search-history", "version": 1, "rounds": rounds, "evaluations": history}
    atomic_write_bytes(out / HISTORY, json.dumps(doc, indent=1).encode(), overwrite=True, what="search history")


def read_history(out: Path, space: PlanSpace) -> tuple[list[dict], int]:
    """The history so far (empty for a new search), each record checked against the space: its genome
    must be canonical and its key that of the plan the genome gives."""
    path = out / HISTORY
    if not path.is_file():
        return [], 0
    try:
        doc = json.loads(path.read_text())
        rounds, records = doc["rounds"], doc["evaluations"]
        for i, r in enumerate(records):
            genome = Genome.from_json(r["genome"])
            if space.canonical(genome) != genome or space.plan(genome).key != r["key"] or r["index"] != i:
                raise ValueError(f"record {i} does not match this search's plan space")
            if not (isinstance(r["reward"], float) and isinstance(r["feasible"], bool)):
                raise ValueError(f"record {i}: reward / feasible of the wrong type")
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise ArtifactError(f"{path}: not a valid search history ({e}); delete it (evaluations stay cached in "
                            f"{EVALS}/) to start the search over") from None
    return records, int(rounds)


def _save_embedding(out: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    from nesc.core.files import atomic_write

    atomic_write(out / "esnac_embedding.safetensors", lambda tmp: save_file(tensors, str(tmp)), overwrite=True,
                 what="ESNAC embedding")


def _best_text(history: list[dict]) -> str:
    best = max((r["reward"] for r in history), default=None)
    return "best reward -" if best is None else f"best reward {best:.4f}"


def _progress(config: SearchConfig, console: Console | None) -> Progress:
    console = console or Console(stderr=True)
    disable = not console.is_terminal if config.progress is None else not config.progress
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=console, disable=disable)
