"""What every experiment shares: a run's description, running it (resumably), and its result file.

A run is one (experiment, dataset, model, method, ratio, policy, init, seed) with the suite's training
settings. Its result is one JSON file under ``benchmarks/results/experiments/runs/``; a run whose file
exists is skipped, so an interrupted suite resumes where it stopped. Scratch state (per-epoch training
checkpoints, trained dense weights that pruning and distillation start from) lives under
``benchmarks/.runs/`` and is not committed.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import nesc
from nesc import baselines
from nesc.baselines import BuildContext
from nesc.core.config import NESConfig
from nesc.data import Dataset, load_dataset
from nesc.core.errors import NescError
from nesc.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "experiments"
RUNS = RESULTS / "runs"
SCRATCH = HERE / ".runs"


@dataclass(frozen=True)
class Settings:
    """Training settings of the whole suite (recorded in every result)."""

    epochs: int = 3
    limit: int = 2000  # train samples (class-balanced, seeded subset)
    test_limit: int = 2000  # first samples of the test split
    batch_size: int = 100
    lr: float = 0.003
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    bn_recalibration: int = 10  # batches: batch-norm statistics recomputed before each evaluation
    epochs_1d: int = 10  # MNIST-1D is small: the whole train split, more epochs
    min_params: int = 128  # nesc's and HashedNets' threshold: smaller weights stay dense
    policy: str = "per_type"  # nesc's default pool policy in these experiments
    full_epochs: int = 5  # the whole Fashion-MNIST train split (dataset "fashion_mnist_full")


# Named variations of a run (``Run.variant``): NESConfig and TrainConfig fields, factory arguments, and
# ``equal_size``: compress the model built with ``model_kwargs`` to the dense parameter count of the
# model without them (the ratio follows from the two sizes).
VARIANTS: dict[str, dict] = {
    "": {},
    "anneal": {"train": {"sampling_width": 3.0, "width_anneal": 0.5, "starts_lr": 0.01}},
    "extent4": {"nes": {"pool_extent": 4}},
    "learner": {"nes": {"learner": True}},
    "spread": {"nes": {"match_spread": True}},
    "wide2": {"model_kwargs": {"width_mult": 2.0}, "equal_size": True},
    "reuse": {"nes": {"reuse": True}},
    "reuse_outputs": {"nes": {"reuse": "outputs"}},
}


@dataclass(frozen=True)
class Run:
    experiment: str
    dataset: str
    model: str
    method: str
    ratio: float
    seed: int
    policy: str = "per_type"
    init: str = "scratch"  # or "dense+distill": nesc fitted to the trained dense model, distilled from it
    variant: str = ""  # a key of VARIANTS

    @property
    def key(self) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        return (f"{self.experiment}-{self.model}-{self.method}{variant}-{self.policy}-{self.init}-r{self.ratio:g}"
                f"-s{self.seed}")

    @property
    def path(self) -> Path:
        return RUNS / f"{self.key}.json"

    def dense(self) -> Run:
        """The dense run this run's pruning or distillation starts from (same dataset, model, seed)."""
        return Run("dense", self.dataset, self.model, "dense", 1, self.seed, self.policy, "scratch")


_DATA: dict[tuple, Dataset] = {}


def dataset(name: str, settings: Settings, seed: int) -> Dataset:
    if name == "fashion_mnist_full":  # the whole train and test splits
        key = (name,)
        if key not in _DATA:
            _DATA.clear()
            _DATA[key] = load_dataset("fashion_mnist")
        return _DATA[key]
    if name == "mnist1d":  # small: the whole standard split
        key = (name,)
        if key not in _DATA:
            _DATA[key] = load_dataset(name)
        return _DATA[key]
    key = (name, seed)
    if key not in _DATA:
        _DATA.clear()  # one Fashion-MNIST subset in memory at a time
        _DATA[key] = load_dataset(name, seed=seed, limit=settings.limit, test_limit=settings.test_limit)
    return _DATA[key]


def train_config(run: Run, settings: Settings) -> TrainConfig:
    epochs = {"mnist1d": settings.epochs_1d, "fashion_mnist_full": settings.full_epochs}.get(run.dataset, settings.epochs)
    return TrainConfig(epochs=epochs, batch_size=settings.batch_size, lr=settings.lr, optimizer=settings.optimizer,
                       weight_decay=settings.weight_decay, schedule="cosine", seed=run.seed, device="cpu",
                       bn_recalibration=settings.bn_recalibration, progress=False,
                       **VARIANTS[run.variant].get("train", {}))


def dense_weights_path(run: Run) -> Path:
    return SCRATCH / "dense" / f"{run.dataset}-{run.model}-s{run.seed}.safetensors"


def execute(run: Run, settings: Settings, command: str, log=print) -> dict:
    """Run ``run`` unless its result exists; returns the result."""
    if run.path.is_file():
        return json.loads(run.path.read_text())
    method = baselines.get_method(run.method)
    needs_dense = method.needs_dense_state or run.init == "dense+distill"
    dense_state = None
    if needs_dense:
        if not dense_weights_path(run.dense()).is_file():
            execute(run.dense(), settings, command, log)
        dense_state = load_file(str(dense_weights_path(run.dense())))
    ds = dataset(run.dataset, settings, run.seed)
    variant = VARIANTS[run.variant]
    nes = NESConfig(min_params=settings.min_params, keep_classifier=False, policy=run.policy, **variant.get("nes", {}))
    kwargs = variant.get("model_kwargs", {})
    ratio = run.ratio
    if variant.get("equal_size"):  # the wide model at the narrow dense model's parameter count
        narrow = BuildContext(run.model, 1, run.seed, ds.x_test[:2]).dense_params
        ratio = BuildContext(run.model, 1, run.seed, ds.x_test[:2], model_kwargs=kwargs).dense_params / narrow
    ctx = BuildContext(run.model, ratio, run.seed, ds.x_test[:2], nes, dense_state=dense_state, model_kwargs=kwargs)
    config = train_config(run, settings)
    result = {"run": dataclasses.asdict(run), "key": run.key, "settings": dataclasses.asdict(settings),
              "train_config": dataclasses.asdict(config), "command": command, "budget": ctx.budget,
              "dense_params": ctx.dense_params, "tolerance": method.tolerance, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "commit": COMMIT}
    t0 = time.perf_counter()
    try:
        model = baselines.build(run.method, ctx)
    except NescError as e:  # a budget the method cannot meet: recorded, not hidden
        result.update(status="infeasible", error=str(e))
        _write(run, result)
        log(f"{run.key}: infeasible ({str(e)[:120]})")
        return result
    build_s = time.perf_counter() - t0
    teacher = None
    if run.init == "dense+distill":
        teacher = baselines.build("dense", BuildContext(run.model, 1, run.seed, ctx.example, dense_state=dense_state))
    out = train_config_dir(run)
    trained = fit(model, ds, config, out_dir=out, teacher=teacher)
    stored = baselines.check_budget(method, model, ctx)  # after training: pruning's non-zeros may change
    result.update(status="ok", test_acc=trained.test_acc, test_loss=trained.test_loss, stored=stored,
                  stored_vs_budget=stored / ctx.budget - 1, build_seconds=build_s, train_seconds=trained.seconds,
                  madd=trained.madd, history=trained.history)
    if run.method == "dense":
        dense_weights_path(run).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_weights_path(run)))
    _write(run, result)
    log(f"{run.key}: acc {trained.test_acc:.4f} stored {stored:,}/{ctx.budget:,} "
        f"train {trained.seconds:.1f}s")
    return result


def _commit() -> str:
    """The source revision that produced a result ("+dirty" when files differed from it)."""
    git = ["git", "-C", str(HERE)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "nesc", "models", "passes", "benchmarks/*.py"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# The revision of the code this process loaded (a later commit does not change what runs).
COMMIT = _commit()


def train_config_dir(run: Run) -> Path:
    return SCRATCH / "train" / run.key


def _write(run: Run, result: dict) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    tmp = run.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(run.path)


def safe_execute(run: Run, settings: Settings, command: str, log=print) -> dict | None:
    """``execute``, but an unexpected error is logged with its traceback and the suite goes on."""
    try:
        return execute(run, settings, command, log)
    except Exception:  # noqa: BLE001 - one broken run must not stop a two-hour suite; it is reported
        log(f"{run.key}: FAILED\n{traceback.format_exc()}")
        return None


__all__ = ["Run", "Settings", "execute", "safe_execute", "nesc"]
