"""The files a training run leaves in its folder: per-epoch checkpoints and the metrics log.

``checkpoint-<epoch>.safetensors`` holds the tensors (model state, optimizer tensors, RNG states),
``checkpoint.json`` everything else (epoch, optimizer hyper-parameters, scheduler state, metrics, the
run's settings) and names the tensor file; it is written last, so a checkpoint is complete when its
JSON names the epoch. ``metrics.json`` / ``metrics.csv`` list every finished epoch. No pickle.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from nesc.core.errors import InputError

CHECKPOINT = "checkpoint"  # checkpoint-<epoch>.safetensors + checkpoint.json
METRICS = "metrics"  # metrics.json + metrics.csv
FORMAT = "nesc-train-checkpoint"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ logs


def write_metrics(out: Path, history: list[dict]) -> None:
    """Every finished epoch's metrics, as JSON (a list of rows) and CSV; written atomically."""
    _atomic_write(out / f"{METRICS}.json", json.dumps(history, indent=1))
    tmp = out / f"{METRICS}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / f"{METRICS}.csv")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, model, optimizer, scheduler, settings: dict, epoch: int,
                    history: list[dict], elapsed: float) -> None:
    """Tensors to safetensors (model, optimizer state, RNG), everything else to JSON. The JSON is written
    last, so a checkpoint is complete when its JSON names the epoch."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    opt_meta: dict[str, dict] = {}
    for pid, state in opt_state["state"].items():
        opt_meta[str(pid)] = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                opt_meta[str(pid)][key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    # The tensors of epoch k go to their own file, named by the JSON written after it: an interruption
    # between the two writes leaves the previous, consistent pair in place.
    name = f"{CHECKPOINT}-{epoch}.safetensors"
    tmp = out / f"{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / name)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "epoch": epoch, "tensors": name, "elapsed": elapsed,
           "config": settings, "param_groups": opt_state["param_groups"],
           "optimizer_state": opt_meta, "scheduler": _jsonable(scheduler.state_dict()), "history": history}
    _atomic_write(out / f"{CHECKPOINT}.json", json.dumps(doc, indent=1))
    for old in out.glob(f"{CHECKPOINT}-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(out: Path, model, optimizer, scheduler, settings: dict) -> tuple[int, list[dict], float]:
    """Restore model, optimizer, scheduler and RNG from ``out``; returns (epochs done, history, seconds).
    ``settings`` (the run's ``TrainConfig`` as a dict) must match the saved one, but for the number of
    epochs, the progress bar and the device."""
    doc = json.loads((out / f"{CHECKPOINT}.json").read_text())
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise InputError(f"{str(out)!r} holds no nesc training checkpoint of version {FORMAT_VERSION} "
                         f"(found format {doc.get('format')!r} version {doc.get('version')!r}); use another --out "
                         f"directory or delete the old checkpoint")
    saved = {k: v for k, v in doc["config"].items() if k not in ("epochs", "progress", "device")}
    now = {k: v for k, v in settings.items() if k in saved}
    if saved != now:
        diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now[k]}
        raise InputError(f"cannot resume from {str(out)!r}: the checkpoint was written with other settings "
                         f"(saved, now): {diff}; pass the same settings, another --out, or --no-resume")
    # Checkpoints written before tensors were named per epoch used one fixed file name.
    tensors = load_file(str(out / doc.get("tensors", f"{CHECKPOINT}.safetensors")))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"the checkpoint in {str(out)!r} does not fit this model: {e}. Resume with the same "
                         f"model and compression settings, or use another --out directory") from None
    opt_state: dict = {"state": {}, "param_groups": doc["param_groups"]}
    for pid, values in doc["optimizer_state"].items():
        opt_state["state"][int(pid)] = dict(values)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(doc["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(doc["epoch"]), list(doc["history"]), float(doc["elapsed"])


def _jsonable(state: dict) -> dict:
    """A scheduler's state dict without its callables (LambdaLR's lambdas are rebuilt from the config)."""
    return {k: v for k, v in state.items() if not callable(v) and k != "lr_lambdas"}
