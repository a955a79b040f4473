"""The targets of ``fuzz_loaders.py``: how to make a seed file, mutate it, load it and use what loaded.

Runs inside a worker process (``fuzz_loaders.py --worker TARGET``): prints ``start i`` before input ``i``
and one JSON line after it, so that the parent can attribute a crash.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import struct
import sys
import traceback
import warnings
from pathlib import Path

import nesc.models  # noqa: F401,E402 - the real package first: tests/nesc would shadow it as a namespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "nesc" / "serialize")]

# ------------------------------------------------------------------------------------- artifacts

def artifact_seed(work: Path) -> Path:
    import torch

    from nesc.serialize import save
    from serialize_cases import ConvNet, traced, with_regenerate

    path = work / "seed.nesc"
    if not path.exists():
        torch.manual_seed(0)
        save(with_regenerate(traced(ConvNet())), path)
    return path


def artifact_case(seed: Path, i: int, work: Path):
    from mutations import mutate

    path = work / "input.nesc"
    path.write_bytes(mutate(seed.read_bytes(), random.Random(i)))
    return path


def artifact_load(path: Path):
    from nesc.core import inputs, names
    from nesc.serialize import load

    gm = load(path)
    return lambda: gm(*inputs.from_specs(gm.meta[names.INPUT_SPECS]))


# ----------------------------------------------------------------------------------- checkpoints

CHECKPOINT_FILES = ("checkpoint-1.json", "checkpoint-1.safetensors", "checkpoint-2.json", "checkpoint-2.safetensors")


def _checkpoint_setup():
    import torch
    from torch import nn

    from nesc.data import load_dataset
    from nesc.train import TrainConfig

    config = TrainConfig(epochs=3, batch_size=64, lr=0.01, optimizer="adamw", limit=128, progress=False)

    def tiny(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

    return load_dataset("synthetic"), config, tiny


def checkpoint_seed(work: Path) -> Path:
    from nesc.train import fit

    folder = work / "seed-run"
    if not (folder / CHECKPOINT_FILES[-1]).exists():
        shutil.rmtree(folder, ignore_errors=True)
        data, config, tiny = _checkpoint_setup()
        fit(tiny(0), data, config, out_dir=folder, stop_after=2)  # checkpoints 1 and 2 of 3
    return folder


def checkpoint_case(seed: Path, i: int, work: Path) -> Path:
    from safetensors.torch import load, save

    from mutations import _edit_tensor, _edit_value, _raw
    from nesc.checkpoint import document_hash

    global REHASHED
    rng = random.Random(i)
    REHASHED = False
    run = work / "input-run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(seed, run)
    name = rng.choice(CHECKPOINT_FILES + CHECKPOINT_FILES[2:])  # the newest checkpoint twice as often
    data, roll = (run / name).read_bytes(), rng.random()
    if roll < 0.05:
        (run / name).unlink()
        return run
    if roll < 0.5:
        new = _raw(data, rng)
    elif name.endswith(".json"):
        doc = _edit_value(json.loads(data), rng, depth=0)
        if isinstance(doc, dict) and rng.random() < 0.7:  # as software that knows the format would
            doc["sha256"], REHASHED = document_hash(doc), True
        new = json.dumps(doc).encode()
    else:
        tensors = dict(load(data))
        _edit_tensor(tensors, rng)
        new = save({k: v.contiguous() for k, v in tensors.items()})
        if rng.random() < 0.7:  # and re-hash the tensors file in its document
            doc_path = run / name.replace(".safetensors", ".json")
            doc = json.loads(doc_path.read_text())
            doc["tensors_sha256"] = hashlib.sha256(new).hexdigest()
            doc["sha256"], REHASHED = document_hash(doc), True
            doc_path.write_text(json.dumps(doc))
    (run / name).write_bytes(new)
    return run


def checkpoint_load(run: Path):
    """Resume the run (training nothing more); what loaded must hold exactly the weights saved at the
    epoch it resumed from."""
    from safetensors.torch import load_file

    from nesc.train import fit

    data, config, tiny = _checkpoint_setup()
    model = tiny(7)  # other initial weights: only the checkpoint can make them right
    result = fit(model, data, config, out_dir=run, stop_after=1)
    pristine = CHECKPOINT_SEED / f"checkpoint-{result.epochs}.safetensors"
    saved = {k[len("model."):]: v for k, v in load_file(str(pristine)).items() if k.startswith("model.")}

    def check() -> None:
        if REHASHED:  # a consistent edit with its hashes recomputed is a different, valid checkpoint:
            return  # the hashes catch damage, not a deliberate edit (there is no key)
        live = model.state_dict()
        if live.keys() != saved.keys() or any(not live[k].equal(saved[k]) for k in saved):
            raise AssertionError(f"resumed from checkpoint {result.epochs} with other weights than it saved")

    return check


CHECKPOINT_SEED = Path()
REHASHED = False


# ---------------------------------------------------------------------------------- deploy files

def deploy_seed(work: Path) -> Path:
    """A two-layer MLP compressed (pools, routing maps, dense biases), compiled and exported."""
    import torch
    from torch import nn

    import nesc

    library = work / "seed" / "model.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
        x = (torch.randn(2, 16),)
        frozen = nesc.freeze(nesc.transform(model, x, ratio=2, init="random", min_params=0, keep_first=False,
                                            keep_classifier=False))
        nesc.compile(frozen, x).export_library(library)
    return library


def deploy_case(seed: Path, i: int, work: Path) -> Path:
    """Mutate the parameters file (and, 5% of the time, the library's bytes): raw bytes, a header entry's
    JSON, or tensors, with the content hash recomputed most of the time."""
    from safetensors.numpy import load, save

    from mutations import _edit_text, _raw
    from nesc.backends.tvm import runtime

    rng = random.Random(i)
    folder = work / "input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    library = folder / "model.so"
    shutil.copyfile(seed, library)
    data = runtime.params_path(seed).read_bytes()
    roll = rng.random()
    if roll < 0.05:
        library.write_bytes(_raw(seed.read_bytes(), rng))
    elif roll < 0.45:
        data = _raw(data, rng)
    else:
        (n,) = struct.unpack("<Q", data[:8])
        header = dict(json.loads(data[8 : 8 + n])["__metadata__"])
        tensors = dict(load(data))
        if roll < 0.75:
            key = rng.choice(sorted(header))
            header[key] = _edit_text(header[key], rng) if key not in runtime.RAW_KEYS else rng.choice(
                ["", "1", "2", header[key][::-1], header[key] + "0"])
        else:
            _edit_array(tensors, rng)
        if rng.random() < 0.9:
            try:
                ordered = {name: tensors[name] for name in json.loads(header["params"])}
                header["content_sha256"] = runtime.content_sha256(header, ordered)
            except (KeyError, TypeError, ValueError, RecursionError):  # no usable parameter list: no hash
                pass
        data = save(tensors, metadata=header)
    runtime.params_path(library).write_bytes(data)
    return library


def _edit_array(tensors: dict, rng: random.Random) -> None:
    import numpy as np

    name = rng.choice(sorted(tensors))
    a = tensors[name].copy()
    kind = rng.randrange(4)
    if kind == 0 and a.size:
        flat = a.reshape(-1)
        flat[rng.randrange(a.size)] = rng.choice([-(2**31), -1, 2**20, 2**31 - 1]) if a.dtype.kind == "i" else \
            rng.choice([np.nan, np.inf, -1.0, 2.0])
        tensors[name] = flat.reshape(a.shape)
    elif kind == 1:
        tensors[name] = a.astype(rng.choice([np.int64, np.float64, np.int8, np.float16]))
    elif kind == 2:
        tensors[name] = a.reshape(-1)[: max(0, a.size - 1)].copy()
    else:
        del tensors[name]


def deploy_load(library: Path):
    from nesc.backends.tvm import runtime

    model = runtime.load(library)
    return lambda: model(*(spec.example(1) for spec in model.input_specs))

TARGETS = {"artifact": (artifact_seed, artifact_case, artifact_load),
           "checkpoint": (checkpoint_seed, checkpoint_case, checkpoint_load),
           "deploy": (deploy_seed, deploy_case, deploy_load)}


# ----------------------------------------------------------------------------------------- driver

def run_worker(target: str, lo: int, hi: int, work: Path) -> int:
    import torch

    import fuzz_helpers as fh

    warnings.simplefilter("ignore")
    global CHECKPOINT_SEED
    make_seed, make_case, load = TARGETS[target]
    seed = CHECKPOINT_SEED = make_seed(work)
    use = load(seed)  # warm up: torch imports what a first load and run need before anything is recorded
    use()
    for i in range(lo, hi):
        case = make_case(seed, i, work)
        print(f"start {i}", flush=True)
        row = {"i": i, "effects": []}
        with fh.audit([work]) as events:
            row |= _load_one(load, case)
        row["effects"] = events
        use = row.pop("use")
        if use is not None:
            try:
                with torch.no_grad():
                    use()
                row |= {"outcome": "loaded", "type": "-"}
            except Exception as e:  # noqa: BLE001 - loaded but does not run: a gap in the checks
                row |= {"outcome": "other", "type": f"run: {type(e).__name__}", "message": _where(e)}
        print(json.dumps(row), flush=True)
    return 0


def _load_one(load, case: Path) -> dict:
    """{"use": what to run, or None, plus the outcome of a refusal}."""
    from nesc.core.errors import NescError

    try:
        return {"use": load(case)}
    except NescError as e:
        unexpected = getattr(e, "unexpected", False)
        row = {"use": None, "outcome": "unexpected" if unexpected else "refused",
               "type": f"{type(e).__name__}: {_reason(e, case)}"}
        return row | ({"message": _where(e.__cause__ or e)} if unexpected else {})
    except Exception as e:  # noqa: BLE001 - what the fuzzer is here to count
        return {"use": None, "outcome": "other", "type": type(e).__name__, "message": _where(e)}


def _reason(e: BaseException, path: Path) -> str:
    """The kind of refusal: the message without the path, cut before its first detail."""
    text = re.sub(r"'[^']*/[^']*'", "<path>", str(e).replace(str(path), "")).lstrip(": ")
    if text.startswith("invalid artifact ("):
        text = "invalid: " + text[len("invalid artifact ("):]
    head, _, rest = text.partition(": ") if text.startswith("invalid: ") else ("", "", text)
    for stop in ("(", ":", ";", "."):
        rest = rest.split(stop, 1)[0]
    return ((head + ": ") if head else "") + " ".join(rest.split()[:7])


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{str(e)[:120]}{at}"
