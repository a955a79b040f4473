"""Training checkpoints as untrusted input (``nesc/checkpoint.py``): every file hashed and written
atomically, the previous verified checkpoint kept, a damaged newest one reported and skipped (or an
error with ``strict_resume``), version 1 refused, the run folder checked before any training, and a
fuzz run over damaged folders (mutators and side-effect audit from ``tests/fuzz_helpers.py``): a resume
either continues from verified weights or raises nesc's error, and touches nothing else.

Hashes are recomputed here from the format's definition (SHA-256 of the tensors file's bytes; SHA-256
of the canonical JSON of the document's other fields), not by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import fuzz_helpers as fh
import pytest
import torch
from helpers import EXACT, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from nesc import checkpoint
from nesc.checkpoint import read_checkpoint
from nesc.core.errors import (
    CheckpointError,
    InputError,
    NescWarning,
    OutputError,
)
from nesc.data import load_dataset
from nesc.train import TrainConfig, fit

CONFIG = TrainConfig(epochs=3, batch_size=64, lr=0.01, optimizer="adamw", limit=128, progress=False)
FILES = ("checkpoint-1.json", "checkpoint-1.safetensors", "checkpoint-2.json", "checkpoint-2.safetensors")


def tiny(seed: int = 0) -> nn.Module:
    """Batch norm (buffers) and dropout (the global RNG) make an exact resume non-trivial."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def template(data, tmp_path_factory) -> Path:
    """A run interrupted after epoch 2 of 3: checkpoints 1 and 2. Copied, never changed."""
    folder = tmp_path_factory.mktemp("template")
    fit(tiny(), data, CONFIG, out_dir=folder, stop_after=2)
    return folder


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> dict:
    """The final weights of the same run, uninterrupted."""
    model = tiny()
    fit(model, data, CONFIG, out_dir=tmp_path_factory.mktemp("whole"))
    return model.state_dict()


def copy_run(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    return target


def saved_weights(path: Path) -> dict:
    return {k[len("model."):]: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert_close(value, b[key], EXACT, key)


def canonical_hash(doc: dict) -> str:
    fields = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -------------------------------------------- mutators: fuzz_helpers' byte/JSON mutators, applied to files


def flip(path: Path, position: int, mask: int = 1) -> None:
    path.write_bytes(fh.flip(path.read_bytes(), position, mask))


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(fh.truncate(data, int(len(data) * fraction)))


def edit_json(path: Path, where: tuple, value, rehash: bool) -> None:
    """Replace the node at ``where``; ``rehash``: then record the document's new hash, as software that
    knows the format would."""
    doc = fh.replace_at(json.loads(path.read_text()), where, value)
    if rehash:
        doc["sha256"] = canonical_hash(doc)
    path.write_text(json.dumps(doc, indent=1))


def resume(data, folder: Path, **kwargs):
    """Resume the 3-epoch run; returns (model, result, nesc warnings)."""
    model = tiny(7)  # other initial weights: only the checkpoint can make them right
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, data, CONFIG, out_dir=folder, **kwargs)
    return model, result, [str(w.message) for w in caught if issubclass(w.category, NescWarning)]


# ---------------------------------------------------------------------------------- the format


def test_files_hashes_and_the_keep_two_rule(data, template, whole, tmp_path) -> None:
    run = copy_run(template, tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == sorted([*FILES, "metrics.csv", "metrics.json"])
    model, result, notes = resume(data, run)
    assert notes == [] and result.epochs == 3
    # Epoch 3 verified, so checkpoint 1 is gone; 2 stays as the fallback. No temporary file is left.
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2.json", "checkpoint-2.safetensors",
                                                     "checkpoint-3.json", "checkpoint-3.safetensors",
                                                     "metrics.csv", "metrics.json"]
    doc = json.loads((run / "checkpoint-3.json").read_text())
    assert doc["format"] == "nesc-train-checkpoint" and doc["version"] == 2 and doc["epoch"] == 3
    assert doc["sha256"] == canonical_hash(doc)
    assert doc["tensors_sha256"] == hashlib.sha256((run / doc["tensors"]).read_bytes()).hexdigest()
    # What was saved is what was trained, and the resumed run is the uninterrupted one.
    assert_same_weights(saved_weights(run / "checkpoint-3.safetensors"), model.state_dict())
    assert_same_weights(model.state_dict(), whole)


def test_the_saved_weights_are_the_trained_weights(data, tmp_path) -> None:
    model = tiny()
    fit(model, data, CONFIG.replace(epochs=1), out_dir=tmp_path)
    assert_same_weights(saved_weights(tmp_path / "checkpoint-1.safetensors"), model.state_dict())


def test_every_file_is_written_through_atomic_write(data, tmp_path, monkeypatch) -> None:
    """Temporary file, fsync, rename, folder fsync (``nesc.core.files``): checkpoints and logs alike."""
    written: list[str] = []
    for name in ("atomic_write", "atomic_write_bytes"):
        real = getattr(checkpoint, name)
        monkeypatch.setattr(checkpoint, name, lambda path, *a, _real=real, **k: (written.append(Path(path).name),
                                                                                  _real(path, *a, **k))[1])
    fit(tiny(), data, CONFIG.replace(epochs=1), out_dir=tmp_path)
    assert sorted(written) == ["checkpoint-1.json", "checkpoint-1.safetensors", "metrics.csv", "metrics.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)


@pytest.mark.parametrize("name", ["checkpoint-2.json", "checkpoint-2.safetensors"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_each_damage_is_a_checkpoint_error(template, tmp_path, name, damage) -> None:
    run = copy_run(template, tmp_path / "run")
    path = run / name
    {"flip": lambda: flip(path, len(path.read_bytes()) // 2, 8), "truncate": lambda: truncate(path, 0.6),
     "empty": lambda: path.write_bytes(b""), "garbage": lambda: path.write_bytes(os.urandom(300))}[damage]()
    with pytest.raises(CheckpointError, match=name.replace(".", "\\.")):
        read_checkpoint(run, 2)
    read_checkpoint(run, 1)  # the other one is intact


DAMAGES = {
    "bit flip in the tensors": lambda run: flip(run / "checkpoint-2.safetensors", 5000),
    "truncated tensors": lambda run: truncate(run / "checkpoint-2.safetensors", 0.5),
    "missing tensors": lambda run: (run / "checkpoint-2.safetensors").unlink(),
    "empty document": lambda run: (run / "checkpoint-2.json").write_bytes(b""),
    "unparsable document": lambda run: truncate(run / "checkpoint-2.json", 0.7),
    "missing document": lambda run: (run / "checkpoint-2.json").unlink(),
    "edited value": lambda run: edit_json(run / "checkpoint-2.json", ("history", 1, "train_loss"), 0.5, rehash=False),
    "wrong type, rehashed": lambda run: edit_json(run / "checkpoint-2.json", ("history",), "soon", rehash=True),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(data, template, whole, tmp_path,
                                                                            damage) -> None:
    run = copy_run(template, tmp_path / "run")
    DAMAGES[damage](run)
    model, result, notes = resume(data, run)
    assert len(notes) == 1 and "checkpoint-2." in notes[0], notes
    assert "Resuming from checkpoint-1.json (epoch 1) instead" in notes[0]
    # Resumed from epoch 1, it ends exactly as the uninterrupted run, with a complete history.
    assert result.epochs == 3 and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert_same_weights(model.state_dict(), whole)
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-2.json", "checkpoint-2.safetensors",
                                                         "checkpoint-3.json", "checkpoint-3.safetensors"}


def test_strict_resume_refuses_a_damaged_newest_checkpoint(data, template, tmp_path) -> None:
    run = copy_run(template, tmp_path / "run")
    flip(run / "checkpoint-2.safetensors", 5000)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="strict resume.*checkpoint-2.safetensors.*sha256.*--no-resume"):
        fit(tiny(), data, CONFIG, out_dir=run, strict_resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing trained, nothing replaced


def test_no_usable_checkpoint_is_an_error_listing_each_file(data, template, tmp_path) -> None:
    run = copy_run(template, tmp_path / "run")
    flip(run / "checkpoint-2.json", 40)
    (run / "checkpoint-1.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as caught:
        fit(tiny(), data, CONFIG, out_dir=run)
    message = str(caught.value)
    assert "checkpoint-2.json" in message and "checkpoint-1.safetensors: the tensors file is empty" in message
    assert "resume=False (command line: --no-resume)" in message
    # Starting over as advised works, and replaces the damaged files.
    result = fit(tiny(), data, CONFIG.replace(epochs=1), out_dir=run, resume=False)
    assert result.epochs == 1 and {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-1.json",
                                                                                 "checkpoint-1.safetensors"}


def test_tensors_that_do_not_fit_the_model_are_not_loaded(data, template, tmp_path) -> None:
    run = copy_run(template, tmp_path / "run")
    wider = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match="no usable checkpoint.*0.weight is torch.float32 \\(4, 1, 3, 3\\)"):
        fit(wider, data, CONFIG, out_dir=run)


def test_a_rehashed_optimizer_state_that_does_not_fit_is_refused(data, template, tmp_path) -> None:
    run = copy_run(template, tmp_path / "run")
    path = run / "checkpoint-2.json"
    edit_json(path, ("param_groups", 0, "params"), [0, 1], rehash=True)  # this model's optimizer has 5
    with pytest.raises(CheckpointError, match="strict resume.*param_groups\\[0\\].params"):
        fit(tiny(), data, CONFIG, out_dir=run, strict_resume=True)


def test_other_settings_are_an_input_error_not_a_fallback(data, template, tmp_path) -> None:
    run = copy_run(template, tmp_path / "run")
    with pytest.raises(InputError, match="other settings.*'seed': \\(0, 1\\)"):
        fit(tiny(), data, CONFIG.replace(seed=1), out_dir=run)


def test_a_version_1_checkpoint_is_refused(data, tmp_path) -> None:
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": "nesc-train-checkpoint", "version": 1,
                                                          "epoch": 2, "tensors": "checkpoint-2.safetensors"}))
    (tmp_path / "checkpoint-2.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}      ")
    with pytest.raises(CheckpointError, match="version-1 training checkpoint.*cannot be verified.*--no-resume"):
        fit(tiny(), data, CONFIG, out_dir=tmp_path)
    fit(tiny(), data, CONFIG.replace(epochs=1), out_dir=tmp_path, resume=False)
    assert not (tmp_path / "checkpoint.json").exists() and not (tmp_path / "checkpoint-2.safetensors").exists()


def test_a_checkpoint_that_does_not_read_back_keeps_the_previous_one(data, tmp_path, monkeypatch) -> None:
    """The disk corrupts the tensors of epoch 2 as they are written: the run stops with an error and
    checkpoint 1 is still there; the next run reports the damage and continues from it."""
    fit(tiny(), data, CONFIG, out_dir=tmp_path, stop_after=1)
    real = checkpoint.atomic_write_bytes

    def corrupting(path, data, **kwargs):
        if Path(path).name == "checkpoint-2.safetensors":
            data = data[:-1] + bytes([data[-1] ^ 1])
        return real(path, data, **kwargs)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", corrupting)
    with pytest.raises(CheckpointError, match="epoch 2 just written.*does not read back intact.*previous"):
        fit(tiny(), data, CONFIG, out_dir=tmp_path)
    monkeypatch.undo()
    read_checkpoint(tmp_path, 1)
    _, result, notes = resume(data, tmp_path)
    assert result.epochs == 3 and len(notes) == 1 and "checkpoint-2.safetensors" in notes[0]


def test_a_constant_schedule_resumes(data, tmp_path) -> None:
    """LambdaLR's state holds no lambdas; resuming it needs their (empty) entry back."""
    config = CONFIG.replace(schedule="constant", optimizer="sgd")
    whole = tiny()
    fit(whole, data, config, out_dir=tmp_path / "whole")
    fit(tiny(), data, config, out_dir=tmp_path / "cut", stop_after=1)
    resumed = tiny(7)
    fit(resumed, data, config, out_dir=tmp_path / "cut")
    assert_same_weights(resumed.state_dict(), whole.state_dict())


# ------------------------------------------------------------------------------------ run folder


def _no_training(model: nn.Module) -> list:
    calls: list = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_a_run_folder_that_is_a_file_or_a_link_is_refused_before_training(data, tmp_path) -> None:
    model = tiny()
    calls = _no_training(model)
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cases = [(tmp_path / "file", "exists and is not a folder"), (tmp_path / "link", "is a symbolic link"),
             (tmp_path / "file" / "below", "cannot be created")]
    for out, match in cases:
        with pytest.raises(OutputError, match=match):
            fit(model, data, CONFIG, out_dir=out)
    (tmp_path / "real" / "metrics.json").symlink_to(tmp_path / "file")
    with pytest.raises(OutputError, match="metrics.json' is a symbolic link"):
        fit(model, data, CONFIG, out_dir=tmp_path / "real")
    assert calls == [] and (tmp_path / "file").read_text() == "x"


def test_an_unwritable_run_folder_is_refused_before_training(data, tmp_path, monkeypatch) -> None:
    model = tiny()
    calls = _no_training(model)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)  # as root, chmod cannot make a folder read-only
    with pytest.raises(OutputError, match="cannot be created or written to \\(Permission denied\\)"):
        fit(model, data, CONFIG, out_dir=tmp_path)
    assert calls == []


# ------------------------------------------------------------------------------------------ fuzz

HOW = ("bytes", "payload flip", "json", "json, rehashed", "delete")


@st.composite
def mutated(draw, original: bytes, suffix: str) -> tuple[str, bytes | None]:
    """(how, the file's new bytes; None: deleted). A tensors file's "json" is its safetensors header."""
    how = draw(st.sampled_from(HOW))
    if how == "delete":
        return how, None
    if how == "bytes":  # biased toward the first bytes: a safetensors file's header
        return how, draw(fh.byte_mutations(original))
    if how == "payload flip":  # past a safetensors header: tensor data that still parses
        start = 8 + int.from_bytes(original[:8], "little") if suffix == ".safetensors" else 0
        return how, fh.flip(original, draw(st.integers(min(start, len(original) - 1), len(original) - 1)),
                            draw(st.integers(1, 255)))
    if suffix == ".safetensors":
        header, body = fh.split_safetensors(original)
        return how, fh.join_safetensors(draw(fh.json_edit(header)), body)
    doc = draw(fh.json_edit(json.loads(original)))
    if how == "json, rehashed" and isinstance(doc, dict):
        doc = doc | {"sha256": canonical_hash(doc)}
    return how, json.dumps(doc, indent=1).encode()


def test_fuzz_damaged_folders_resume_from_verified_weights_or_raise(data, template) -> None:
    """One file of a 2-checkpoint folder mutated at random (fuzz_helpers' byte and JSON mutations,
    or deleted); a resume that trains nothing more (``stop_after=1``) must raise nesc's error or hold
    exactly the weights saved at the epoch it resumed from (read from the pristine template): 2 when
    checkpoint 2 verifies, else 1 after a warning; and touch nothing outside the run folder. (That
    training on from 1 ends as an uninterrupted run is checked above.)"""
    saved = {k: saved_weights(template / f"checkpoint-{k}.safetensors") for k in (1, 2)}
    audit: Counter = Counter()
    kinds: Counter = Counter()  # (mutation, file): outcome

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(name=st.sampled_from(FILES + FILES[2:]), strict=st.booleans(), draw=st.data())  # the newest: 2x
    def check(name: str, strict: bool, draw) -> None:
        original = (template / name).read_bytes()
        how, new = draw.draw(mutated(original, Path(name).suffix), label="mutation")
        with tempfile.TemporaryDirectory() as tmp:
            run = copy_run(template, Path(tmp) / "run")
            if new is None:
                (run / name).unlink()
            else:
                (run / name).write_bytes(new)
            with fh.audit([run]) as events:
                try:
                    model, result, notes = resume(data, run, strict_resume=strict, stop_after=1)
                    outcome = "fallback" if notes else "resumed"
                except (CheckpointError, InputError) as e:
                    outcome = type(e).__name__
            # Python source read for a warning's or traceback's line (linecache) is not the reader's doing.
            assert [e for e in events if not e.endswith(".py'")] == [], events
        kinds[f"{how} {name}: {outcome}"] += 1
        if outcome in ("CheckpointError", "InputError"):
            # One damaged file leaves the other checkpoint: only strict resume gives up.
            assert strict or outcome == "InputError", f"{how} {name}: no fallback"
            audit[f"error ({outcome})"] += 1
            return
        assert_same_weights(model.state_dict(), saved[result.epochs])
        if notes:
            assert result.epochs == 1 and not strict and len(notes) == 1 and name.startswith("checkpoint-2") \
                and name in notes[0], notes
            audit["fallback to checkpoint 1"] += 1
        else:
            assert result.epochs == 2
            assert not name.startswith("checkpoint-2") or _verifies(original, new, how)
            audit["resumed from checkpoint 2"] += 1

    check()
    assert sum(audit.values()) >= 90
    assert audit["fallback to checkpoint 1"] and audit["error (CheckpointError)"] and audit["resumed from checkpoint 2"]
    if os.environ.get("NESC_FUZZ_AUDIT"):  # a summary for a report: NESC_FUZZ_AUDIT=path pytest ...
        Path(os.environ["NESC_FUZZ_AUDIT"]).write_text(json.dumps({"outcomes": audit, "by kind": kinds}, indent=1))


def _verifies(original: bytes, new: bytes | None, how: str) -> bool:
    """A mutation of the newest checkpoint that still verifies: the same bytes, a document that parses
    to the same content (``1e-08`` / ``1E-08``), or a document edit re-hashed as software that knows
    the format would."""
    if new is None or new == original:
        return new is not None
    try:
        return how == "json, rehashed" or json.loads(new) == json.loads(original)
    except ValueError:
        return False
