"""Evaluating a plan: a short fine-tune with distillation from the dense model, scored on held-out data.

The dataset's train split is cut once (seeded) into a search-train part and a held-out part; the test
split is never read. The dense model (the teacher, and the accuracy rewards are relative to) is
trained on the search-train part under ``<run dir>/dense`` (resumable, ``nesc.train.fit``) or read
from a local checkpoint, and kept as ``dense.safetensors`` with its held-out accuracy in
``dense.json``. Each evaluation builds the plan's model (fitted to the dense weights at width 1, drawn
at random when wider), fine-tunes it for ``epochs`` on the search-train part with the dense model as
teacher, freezes it and reports its held-out accuracy and stored parameters.

``evaluate_plan`` takes and returns plain JSON values only, so that local worker processes (spawned)
and Ray tasks can run it; it reads the dense weights from the run dir, which must therefore be on a
filesystem every worker sees.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nesc.api import freeze, transform
from nesc.core.config import checked_fields
from nesc.core.errors import ArtifactError, ConfigError, PlanError
from nesc.core.files import atomic_write, atomic_write_bytes
from nesc.data import Dataset, load_dataset
from nesc.fitting import load_checkpoint
from nesc.models import get_spec
from nesc.report import stored_params
from nesc.train import TrainConfig, evaluate, fit

from .plan import from_json

DENSE_WEIGHTS, DENSE_INFO = "dense.safetensors", "dense.json"


@checked_fields
@dataclass(frozen=True)
class EvalSettings:
    """How plans are evaluated. limit: a class-balanced subset of the train split (None: all of it);
    holdout: the share of it held out for scoring; epochs / batch_size / lr: the fine-tune of each plan
    (AdamW, cosine, batch-norm statistics recomputed over 10 batches before scoring: short runs need it,
    see ``TrainConfig.bn_recalibration``); dense_epochs: training of the dense model when no checkpoint is given."""

    model: str
    dataset: str
    epochs: int = 1
    limit: int | None = None
    holdout: float = 0.2
    batch_size: int = 64
    lr: float = 0.003
    dense_epochs: int = 5
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        get_spec(self.model)  # an unknown model lists the valid ones
        for name in ("epochs", "batch_size", "dense_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"EvalSettings.{name} must be an int >= 1, got {value!r}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"EvalSettings.holdout must be a share in (0, 1), got {self.holdout!r}")
        if not self.lr > 0:
            raise ConfigError(f"EvalSettings.lr must be > 0, got {self.lr!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adamw", weight_decay=1e-4,
                           bn_recalibration=10, seed=self.seed, progress=False, device="cpu")


@functools.lru_cache(maxsize=2)
def search_data(settings: EvalSettings) -> Dataset:
    """The search's dataset: train = the search-train part, test = the held-out part of the train split."""
    ds = load_dataset(settings.dataset, seed=settings.seed, limit=settings.limit, data_dir=settings.data_dir)
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(settings.seed))
    cut = max(1, round(settings.holdout * len(order)))
    held, kept = order[:cut], order[cut:]
    return Dataset(ds.spec, ds.x_train[kept], ds.y_train[kept], ds.x_train[held], ds.y_train[held])


def build_model(settings: EvalSettings, width: float = 1.0) -> torch.nn.Module:
    kwargs = {} if width == 1.0 else {"width_mult": width}
    return get_spec(settings.model).create(num_classes=search_data(settings).spec.num_classes, **kwargs)


def prepare_dense(settings: EvalSettings, run_dir: Path, init: Path | None = None) -> dict:
    """Train (or load) the dense model once; return ``{"acc", "params"}`` (held-out accuracy, size)."""
    info = run_dir / DENSE_INFO
    if info.is_file() and (run_dir / DENSE_WEIGHTS).is_file():
        return read_dense_info(info)
    ds = search_data(settings)
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    if init is not None:
        load_checkpoint(model, init)
    else:
        fit(model, ds, settings.train_config(settings.dense_epochs), out_dir=run_dir / "dense")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / DENSE_WEIGHTS, lambda tmp: save_file(state, str(tmp)), overwrite=True, what="dense weights")
    _, acc = evaluate(model, ds)
    doc = {"acc": acc, "params": sum(p.numel() for p in model.parameters())}
    atomic_write_bytes(info, json.dumps(doc).encode(), overwrite=True, what="dense summary")
    return doc


def read_dense_info(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable dense summary ({e}); delete it to retrain the dense model") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("acc"), float) and 0 < doc["acc"] <= 1
            and isinstance(doc.get("params"), int) and doc["params"] > 0):
        raise ArtifactError(f"{path}: expected {{'acc': float in (0, 1], 'params': int > 0}}, got {doc!r}; "
                            f"delete it to retrain the dense model")
    return doc


@functools.lru_cache(maxsize=2)
def _teacher(settings: EvalSettings, run_dir: str) -> torch.nn.Module:
    model = build_model(settings)
    model.load_state_dict(load_file(str(Path(run_dir) / DENSE_WEIGHTS)))
    return model.eval()


def evaluate_plan(settings_doc: dict, plan_doc: dict, run_dir: str, threads: int | None = None) -> dict:
    """Fine-tune and score one plan: ``{"acc", "params", "seconds", "feasible"[, "error"]}``."""
    if threads is not None:
        torch.set_num_threads(threads)
    settings, plan = EvalSettings(**settings_doc), from_json(plan_doc)
    t0 = time.perf_counter()
    ds, teacher = search_data(settings), _teacher(settings, run_dir)
    torch.manual_seed(settings.seed)
    model = build_model(settings, plan.width)
    if plan.width == 1.0:
        model.load_state_dict(teacher.state_dict())
    init = "dense" if plan.width == 1.0 else "random"
    try:
        gm = transform(model, (ds.x_train[:2],), plan.nes_config(init=init, seed=settings.seed))
    except PlanError as e:  # the budget cannot hold this plan: infeasible, nothing to train
        return {"acc": 0.0, "params": None, "seconds": time.perf_counter() - t0, "feasible": False,
                "error": str(e).splitlines()[0][:300]}
    fit(gm, ds, settings.train_config(settings.epochs), teacher=teacher)
    frozen = freeze(gm)
    _, acc = evaluate(frozen, ds)
    params = stored_params(frozen)
    if not math.isfinite(acc):
        acc = 0.0
    return {"acc": acc, "params": params, "seconds": time.perf_counter() - t0, "feasible": True}
