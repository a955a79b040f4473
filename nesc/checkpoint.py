"""The files a training run leaves in its folder: verified per-epoch checkpoints and the metrics log.

Format version 2. Epoch k's checkpoint is two files, each written by ``nesc.core.files.atomic_write``
(temporary file, fsync, rename, folder fsync), tensors first, so a checkpoint exists once its document does:

* ``checkpoint-<k>.safetensors``: model state, optimizer tensors, RNG states;
* ``checkpoint-<k>.json``: epoch, optimizer hyper-parameters and scalar state, scheduler state, metrics
  history, the run's settings, the tensors file's name and the SHA-256 of its bytes (``tensors_sha256``),
  and ``sha256``: of the canonical JSON (sorted keys, no spaces) of all the document's other fields.

Keep two: a new checkpoint is read back and hash-checked before anything is deleted; then the folder
keeps it and the verified one before it, nothing older. Resume tries the newest first; a damaged one
(bad hash, truncated, empty, unparsable, wrong types, tensors that do not fit the model or optimizer)
is reported with a ``NescWarning`` and the one before it used (``strict``: a ``CheckpointError``, as
when none is usable). Nothing is restored before it is verified and checked against the live objects.
Version 1 (one ``checkpoint.json``, no hashes) is refused. ``metrics.json`` / ``.csv``: every epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from nesc.core.errors import CheckpointError, InputError, NescWarning, OutputError
from nesc.core.files import atomic_write, atomic_write_bytes, check_output

CHECKPOINT = "checkpoint"  # checkpoint-<epoch>.safetensors + checkpoint-<epoch>.json
METRICS = "metrics"  # metrics.json + metrics.csv
FORMAT = "nesc-train-checkpoint"
FORMAT_VERSION = 2
V1_FILES = (f"{CHECKPOINT}.json", f"{CHECKPOINT}.safetensors")  # version 1's document, its oldest tensors
MAX_DOCUMENT_BYTES = 64 << 20  # a document holds settings and one metrics row per epoch: kilobytes
IGNORED_SETTINGS = ("epochs", "progress", "device")  # may change between a run and its resume
START_OVER = "pass resume=False (command line: --no-resume) to start over"
_FILE = re.compile(rf"{CHECKPOINT}-([1-9][0-9]*)\.(json|safetensors)")
_INDEX = re.compile("[0-9]{1,9}")  # a parameter's index in the optimizer (str.isdigit also takes "²")
_FIELDS = {"epoch": int, "tensors": str, "tensors_sha256": str, "elapsed": (int, float), "config": dict,
           "param_groups": list, "optimizer_state": dict, "scheduler": dict, "history": list}


def document_name(epoch: int) -> str:
    return f"{CHECKPOINT}-{epoch}.json"


def tensors_name(epoch: int) -> str:
    return f"{CHECKPOINT}-{epoch}.safetensors"


# ------------------------------------------------------------------------------------- run folder


def prepare_run_dir(out_dir: str | os.PathLike) -> Path:
    """The run folder, created when missing and checked before any training: a real folder (not a
    file, not a link), writable, whose log files can be replaced. Every failure is an ``OutputError``."""
    out = Path(out_dir)
    try:
        st = os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):  # missing (under a file: mkdir says so below)
        st = None
    except OSError as e:
        raise OutputError(f"run folder {str(out)!r}: cannot inspect it ({e.strerror}); pass another folder") from e
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"run folder {str(out)!r} is a symbolic link (to {os.path.realpath(out)!r}); nesc "
                          f"does not write through links. Pass the real folder or another one.")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"run folder {str(out)!r} exists and is not a folder; pass a folder path (it is "
                          f"created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)  # os.access says yes to root always
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"run folder {str(out)!r} cannot be created or written to ({e.strerror}); pass a "
                          f"folder you can write to") from e
    for name in (f"{METRICS}.json", f"{METRICS}.csv"):
        check_output(out / name, overwrite=True, what="training log")
    return out


def write_metrics(out: Path, history: list[dict]) -> None:
    """Every finished epoch's metrics, as JSON (a list of rows) and CSV; each written atomically."""
    atomic_write_bytes(out / f"{METRICS}.json", json.dumps(history, indent=1).encode(), overwrite=True,
                       what="training log")

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)

    atomic_write(out / f"{METRICS}.csv", write_csv, overwrite=True, what="training log")


# ------------------------------------------------------------------------------------------ write


def save_checkpoint(out: Path, model, optimizer, scheduler, settings: dict, epoch: int, history: list[dict],
                    elapsed: float, keep: int | None = None) -> None:
    """Write epoch ``epoch``'s checkpoint, read it back and check both hashes; then delete every other
    checkpoint but ``keep`` (the previous verified one of this run; None: there is none)."""
    tensors, opt_meta = _collect(model, optimizer)
    data = save_tensors(tensors)
    _remove(out / document_name(epoch))  # a stale document of this epoch must never name the new tensors
    atomic_write_bytes(out / tensors_name(epoch), data, overwrite=True, what="checkpoint tensors")
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "epoch": epoch, "tensors": tensors_name(epoch),
           "tensors_sha256": hashlib.sha256(data).hexdigest(), "elapsed": elapsed, "config": settings,
           "param_groups": optimizer.state_dict()["param_groups"], "optimizer_state": opt_meta,
           "scheduler": _jsonable(scheduler.state_dict()), "history": history}
    doc["sha256"] = document_hash(doc)
    atomic_write_bytes(out / document_name(epoch), json.dumps(doc, indent=1).encode(), overwrite=True,
                       what="checkpoint")
    try:
        back, _ = read_checkpoint(out, epoch)
        problem = "" if back["sha256"] == doc["sha256"] else "it reads back as another checkpoint"
    except CheckpointError as e:
        problem = str(e)
    if problem:
        raise CheckpointError(f"the checkpoint of epoch {epoch} just written to {str(out)!r} does not read back "
                              f"intact ({problem}): the disk or file system loses data. The previous checkpoint "
                              f"is kept; check the disk, then resume.")
    for path in out.iterdir():
        match = _FILE.fullmatch(path.name)
        if (match and int(match.group(1)) not in (epoch, keep)) or path.name in V1_FILES:
            _remove(path)


def document_hash(doc: dict) -> str:
    """SHA-256 of the canonical JSON of every field but ``sha256`` itself."""
    fields = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _collect(model, optimizer) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """The tensors to store (model, optimizer tensors, RNG) and the optimizer's scalar state."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_meta: dict[str, dict] = {}
    for pid, state in optimizer.state_dict()["state"].items():
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
    return tensors, opt_meta


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"cannot remove the old checkpoint file {str(path)!r} ({e.strerror}); remove it by "
                          f"hand, or pass another run folder") from e


def _jsonable(state: dict) -> dict:
    """A scheduler's state dict without its callables (LambdaLR's lambdas are rebuilt from the config)."""
    return {k: v for k, v in state.items() if not callable(v) and k != "lr_lambdas"}


# ------------------------------------------------------------------------------------------- read


def read_checkpoint(out: Path, epoch: int) -> tuple[dict, dict[str, Tensor]]:
    """The verified document and tensors of epoch ``epoch``; a ``CheckpointError`` says what is wrong."""
    path = out / document_name(epoch)
    raw = _read_file(path, "the checkpoint document", MAX_DOCUMENT_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or damaged") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(doc).__name__}, not a checkpoint document")
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a nesc training checkpoint of version {FORMAT_VERSION} (found format "
                              f"{doc.get('format')!r:.60}, version {doc.get('version')!r:.20})")
    try:
        intact = doc.get("sha256") == document_hash(doc)
    except (RecursionError, ValueError):
        intact = False
    if not intact:
        raise CheckpointError(f"{path}: its content does not match the sha256 it records: damaged or edited")
    _check_document(path, doc, epoch)
    data = _read_file(out / doc["tensors"], "the tensors file", None)
    if hashlib.sha256(data).hexdigest() != doc["tensors_sha256"]:
        raise CheckpointError(f"{out / doc['tensors']}: its bytes do not match the sha256 that {path.name} "
                              f"records: damaged or replaced")
    try:
        tensors = load_tensors(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a malformed header
        raise CheckpointError(f"{out / doc['tensors']}: not a readable safetensors file ({e})") from None
    if "rng.cpu" not in tensors or any(not k.startswith(("model.", "optim.", "rng.")) for k in tensors):
        raise CheckpointError(f"{out / doc['tensors']}: tensor names are not those of a training checkpoint")
    return doc, tensors


def _read_file(path: Path, what: str, limit: int | None) -> bytes:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: {what} is not a regular file (a link, folder or device); nesc "
                                  f"reads only the files it wrote")
        if st.st_size == 0:
            raise CheckpointError(f"{path}: {what} is empty (0 bytes); a write was cut short or lost")
        if limit is not None and st.st_size > limit:
            raise CheckpointError(f"{path}: {what} has {st.st_size:,} bytes, more than any checkpoint "
                                  f"document ({limit:,})")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None


def _check_document(path: Path, doc: dict, epoch: int) -> None:
    """Every field of a hash-verified document has the type and range the loader relies on."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the document was edited or written by other software")

    for key, kind in _FIELDS.items():
        if isinstance(doc.get(key), bool) or not isinstance(doc.get(key), kind):
            raise bad(f"field {key!r} is {type(doc.get(key)).__name__}, expected {getattr(kind, '__name__', 'number')}")
    if doc["epoch"] != epoch or doc["tensors"] != tensors_name(epoch):
        raise bad(f"it names epoch {doc['epoch']} and tensors {doc['tensors']!r:.80}, not those of its file name")
    if not 0 <= doc["elapsed"] < 1e12:  # NaN fails too; a huge int would overflow float()
        raise bad(f"elapsed is {doc['elapsed']!r:.30}, not a number of seconds")
    rows = doc["history"]
    if len(rows) != epoch or any(not isinstance(r, dict) or r.get("epoch") != i + 1 or not all(
            _is_number(v) for v in r.values()) for i, r in enumerate(rows)):
        raise bad(f"history is not {epoch} rows of numbers for epochs 1..{epoch}")
    if any(not isinstance(g, dict) for g in doc["param_groups"]):
        raise bad("param_groups is not a list of objects")
    for pid, values in doc["optimizer_state"].items():
        if not _INDEX.fullmatch(pid) or not isinstance(values, dict) or not all(
                v is None or isinstance(v, bool) or _is_number(v) for v in values.values()):
            raise bad(f"optimizer_state[{pid!r:.20}] is not scalar state of a parameter")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------- restore


def resume_checkpoint(out: Path, model, optimizer, scheduler, settings: dict,
                      strict: bool = False) -> tuple[int, list[dict], float] | None:
    """Restore model, optimizer, scheduler and RNG from the newest usable checkpoint in ``out``;
    returns (epochs done, history, seconds), or None when ``out`` holds no checkpoint.

    A damaged newest checkpoint is reported (``NescWarning``) and the one before it used; ``strict``
    raises ``CheckpointError`` instead. ``settings`` (the run's ``TrainConfig`` as a dict) must match
    the saved ones but for ``IGNORED_SETTINGS`` (``InputError`` otherwise)."""
    documents, orphans = _listing(out)
    problems = [f"{out / tensors_name(k)}: tensors without their document {document_name(k)} (a write was cut "
                f"short, or the document was lost)" for k in sorted(orphans, reverse=True) if k > max(documents, default=0)]
    if not documents and any((out / name).exists() for name in V1_FILES):
        raise CheckpointError(f"{str(out)!r} holds a version-1 training checkpoint ({V1_FILES[0]}, no hashes), "
                              f"which cannot be verified; {START_OVER}, or use another run folder")
    for epoch in sorted(documents, reverse=True):
        if problems and strict:
            raise CheckpointError(f"cannot resume from {str(out)!r} (strict resume): {problems[0]}. Without strict "
                                  f"resume the run falls back to an older checkpoint; or {START_OVER}")
        try:
            doc, tensors = read_checkpoint(out, epoch)
            _check_settings(out, doc["config"], settings)
            _restore(doc, tensors, model, optimizer, scheduler)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{str(out)!r}: the newest checkpoint is not usable: {'; '.join(problems)}. Resuming "
                          f"from {document_name(epoch)} (epoch {epoch}) instead; later epochs are trained again.",
                          NescWarning, stacklevel=3)
        return epoch, list(doc["history"]), float(doc["elapsed"])
    if problems and not documents and not strict:  # only tensors whose document was never written
        warnings.warn(f"{str(out)!r}: {'; '.join(problems)}. Nothing to resume from: training starts over.",
                      NescWarning, stacklevel=3)
    elif problems:
        raise CheckpointError(f"no usable checkpoint in {str(out)!r}: {'; '.join(problems)}. Restore the files "
                              f"from a backup, or {START_OVER}")
    return None


def _listing(out: Path) -> tuple[set[int], set[int]]:
    """Epochs with a checkpoint document, and epochs with only a tensors file."""
    documents, tensors = set(), set()
    try:
        for path in out.iterdir():
            match = _FILE.fullmatch(path.name)
            if match:
                (documents if match.group(2) == "json" else tensors).add(int(match.group(1)))
    except OSError as e:
        raise CheckpointError(f"cannot list the run folder {str(out)!r} ({e.strerror})") from None
    return documents, tensors - documents


def _check_settings(out: Path, saved: dict, settings: dict) -> None:
    saved = {k: v for k, v in saved.items() if k not in IGNORED_SETTINGS}
    now = {k: v for k, v in settings.items() if k not in IGNORED_SETTINGS}
    if saved != now:
        diff = {k: (saved.get(k, "<missing>"), now.get(k, "<missing>")) for k in sorted(now.keys() | saved.keys())
                if saved.get(k, KeyError) != now.get(k, KeyError)}
        raise InputError(f"cannot resume from {str(out)!r}: the checkpoint was written with other settings "
                         f"(saved, now): {diff}; pass the same settings, another run folder, or --no-resume")


def _restore(doc: dict, tensors: dict[str, Tensor], model, optimizer, scheduler) -> None:
    """Check every saved piece against the live objects, then load them all."""
    where = f"{document_name(doc['epoch'])} with {doc['tensors']}"
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_tensors(where, "the model", model_state, model.state_dict())
    live = optimizer.state_dict()
    _check_like(where, "param_groups", doc["param_groups"], live["param_groups"])
    if [g["params"] for g in doc["param_groups"]] != [g["params"] for g in live["param_groups"]]:
        raise CheckpointError(f"{where}: the optimizer's parameter groups differ from this model's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict = {"state": {int(pid): dict(v) for pid, v in doc["optimizer_state"].items()},
                       "param_groups": doc["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = (key.split(".", 2) + ["", ""])[:3]
            if not _INDEX.fullmatch(pid) or int(pid) >= len(params) or not name or name in opt_state["state"].get(int(pid), {}) \
                    or not value.is_floating_point() or value.shape not in (params[int(pid)].shape, torch.Size([])):
                raise CheckpointError(f"{where}: optimizer tensor {key!r:.60} does not fit this model's parameters")
            opt_state["state"].setdefault(int(pid), {})[name] = value
    if any(pid >= len(params) for pid in opt_state["state"]):
        raise CheckpointError(f"{where}: the optimizer state names parameters this model does not have")
    sched_live = scheduler.state_dict()
    _check_like(where, "scheduler", doc["scheduler"], _jsonable(sched_live))
    sched_state = dict(doc["scheduler"])
    if "lr_lambdas" in sched_live:  # LambdaLR's load_state_dict needs the entry; its lambdas carry no state
        sched_state["lr_lambdas"] = [None] * len(sched_live["lr_lambdas"])
    rng = tensors["rng.cpu"]
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape or any(
            s.dtype != torch.uint8 or s.dim() != 1 for s in cuda):
        raise CheckpointError(f"{where}: the random generator states are not those torch saves")
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
        torch.set_rng_state(rng)
        if torch.cuda.is_available():
            for i, state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, i)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{where}: could not be restored ({type(e).__name__}: {e})") from None


def _check_tensors(where: str, what: str, saved: dict[str, Tensor], live: dict[str, Tensor]) -> None:
    missing, extra = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or extra:
        raise CheckpointError(f"{where}: does not fit {what}: missing {missing[:5]}, unexpected {extra[:5]}. "
                              f"Resume with the same model and compression settings, or {START_OVER}")
    for key, value in live.items():
        if saved[key].shape != value.shape or saved[key].dtype != value.dtype:
            raise CheckpointError(f"{where}: {key} is {saved[key].dtype} {tuple(saved[key].shape)}, {what} has "
                                  f"{value.dtype} {tuple(value.shape)}. Resume with the same model, or {START_OVER}")


def _check_like(where: str, name: str, saved, live) -> None:
    """``saved`` (from JSON) has the structure and scalar types of ``live``: same keys, same lengths."""
    if isinstance(live, bool) or live is None or isinstance(live, str):
        ok = type(saved) is type(live)
    elif isinstance(live, (int, float)):
        ok = _is_number(saved) and (isinstance(live, float) or isinstance(saved, int))
    elif isinstance(live, (list, tuple)):
        ok = isinstance(saved, list) and len(saved) == len(live)
        for i, (s, v) in enumerate(zip(saved, live) if ok else ()):
            _check_like(where, f"{name}[{i}]", s, v)
    elif isinstance(live, dict):
        ok = isinstance(saved, dict) and saved.keys() == live.keys()
        for key in live if ok else ():
            _check_like(where, f"{name}.{key}", saved[key], live[key])
    else:
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: {name} is a {type(saved).__name__}, which does not fit this run's "
                              f"{type(live).__name__} {str(live)[:60]}")
