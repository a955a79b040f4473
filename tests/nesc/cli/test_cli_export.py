"""``nesc export -o FILE.onnx`` (``nesc/cli/export.py``): from a saved artifact (input shape from the artifact)
and from a registry model compressed on the fly (dense ONNX exported next to it); errors exit 2 without
a traceback; ``-o/--out`` is checked before any work and an existing file is replaced only with ``--force``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BACKEND_REL, registry_inputs, run, transformed_registry

import nesc
from nesc.cli import USAGE_ERROR
from nesc.cli import export as export_verb
from cli_cases import run as _run, assert_clean_error

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'nesc[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'nesc[onnx]'")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    _, gm = transformed_registry("cnn1d")
    path = tmp_path_factory.mktemp("cli-export") / "cnn1d.nesc"
    nesc.save(nesc.freeze(gm), path)
    return path


def _assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == USAGE_ERROR
    assert_clean_error(err, *fragments)


def test_export_an_artifact_with_its_saved_input_shape(capsys, artifact: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "cnn1d.onnx"
    code, out, err = _run(capsys, "export", str(artifact), "-o", str(out_path))
    assert code == 0, err
    assert out_path.is_file() and not list(tmp_path.glob("*.data"))
    assert "compressed (pools + routing maps)" in out and "dense float32 weights (not exported)" in out
    assert "Gather" in out  # the regeneration: one gather into the pool
    # The file computes what the artifact computes, at another batch size than the saved one.
    loaded = nesc.load(artifact)
    x = torch.randn(3, *registry_inputs("cnn1d")[0].shape[1:])
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = run(loaded, (x,)).numpy()
    assert np.abs(got - want).max() <= BACKEND_REL * np.abs(want).max()


def test_export_a_registry_model_compressed_on_the_fly_next_to_its_dense_file(capsys, tmp_path: Path) -> None:
    out_path = tmp_path / "mlp.onnx"
    code, out, err = _run(capsys, "export", "mlp", "--ratio", "4", "-o", str(out_path), "--opset", "18")
    assert code == 0, err
    assert "dense, exported the same way" in out
    ratio = float(out.split("dense, exported the same way")[1].split("x")[0].split()[-1])
    assert 3.5 < ratio < 4.1, out
    assert out_path.is_file()


def test_no_simplify_writes_the_raw_export(capsys, artifact: Path, tmp_path: Path) -> None:
    simplified, raw = tmp_path / "s.onnx", tmp_path / "r.onnx"
    assert _run(capsys, "export", str(artifact), "-o", str(simplified))[0] == 0
    assert _run(capsys, "export", str(artifact), "-o", str(raw), "--no-simplify")[0] == 0
    assert len(onnx.load(str(raw)).graph.node) > len(onnx.load(str(simplified)).graph.node)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--ratio", "8"], ["cannot apply --ratio", "saved artifact"]),
        (["--opset", "13"], ["opset must be an int from 18"]),
    ],
)
def test_bad_flags_on_an_artifact_exit_2_with_one_message(capsys, artifact, tmp_path, extra, fragments) -> None:
    code, _, err = _run(capsys, "export", str(artifact), "-o", str(tmp_path / "x.onnx"), *extra)
    _assert_clean_error(code, err, *fragments)


def test_an_output_folder_that_does_not_exist_is_an_error(capsys, artifact, tmp_path) -> None:
    code, _, err = _run(capsys, "export", str(artifact), "-o", str(tmp_path / "nope" / "x.onnx"))
    _assert_clean_error(code, err, "does not exist")


def test_input_size_must_fit_the_artifact(capsys, artifact, tmp_path, monkeypatch) -> None:
    from nesc.core import names
    real_load = nesc.load

    def without_specs(path):  # an artifact that records no input shape
        gm = real_load(path)
        gm.meta[names.INPUT_SPECS] = []
        return gm

    monkeypatch.setattr(export_verb, "load", without_specs)  # the verb imports load from nesc.api
    code, _, err = _run(capsys, "export", str(artifact), "-o", str(tmp_path / "x.onnx"))
    _assert_clean_error(code, err, "records no input shape", "--input-size")


def test_onnx_out_is_required(capsys, artifact) -> None:
    code, _, err = _run(capsys, "export", str(artifact))
    assert code == USAGE_ERROR and "-o/--out" in err


# ------------------------------------------------------------------- nothing is replaced silently


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before -o/--out was refused")


@pytest.mark.parametrize("kind, words", [
    ("existing", "already exists; pass overwrite=True (command line: --force)"),
    ("symlink", "is a symbolic link"),
    ("fifo", "is not a regular file"),
    ("directory", "is a directory"),
    ("missing folder", "does not exist"),
])
def test_an_unsafe_onnx_path_is_refused_before_any_work(capsys, artifact, tmp_path, monkeypatch, kind, words) -> None:
    monkeypatch.setattr(export_verb, "load", _no_work)
    monkeypatch.setattr(export_verb, "transform", _no_work)
    old = tmp_path / "old.onnx"
    old.write_bytes(b"keep")
    path = {"existing": old, "symlink": tmp_path / "l.onnx", "fifo": tmp_path / "p.onnx",
            "directory": tmp_path / "d.onnx", "missing folder": tmp_path / "no" / "x.onnx"}[kind]
    if kind == "symlink":
        path.symlink_to(old)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    for model in (str(artifact), "mlp"):
        code, _, err = _run(capsys, "export", model, "-o", str(path))
        _assert_clean_error(code, err, f"-o/--out {str(path)!r}", words)
    assert old.read_bytes() == b"keep"


def test_force_replaces_an_existing_onnx_file(capsys, artifact, tmp_path) -> None:
    out_path = tmp_path / "cnn1d.onnx"
    out_path.write_bytes(b"an older export")
    code, _, err = _run(capsys, "export", str(artifact), "-o", str(out_path), "--force")
    assert code == 0, err
    assert onnx.load(str(out_path)).graph.node and not list(tmp_path.glob("*.partial"))


def test_force_reaches_export_onnx_as_overwrite(capsys, artifact, tmp_path, monkeypatch) -> None:
    seen = []

    def fake_export(*args, overwrite=False, **kwargs):
        seen.append(overwrite)
        raise nesc.NescError("stop here")  # the flag is what this test checks

    monkeypatch.setattr(export_verb, "export_onnx", fake_export)
    for flags in ([], ["--force"]):
        code, _, err = _run(capsys, "export", str(artifact), "-o", str(tmp_path / "x.onnx"), *flags)
        assert code == USAGE_ERROR and "stop here" in err
    assert seen == [False, True]


def test_json_is_one_document_with_the_file_and_its_sizes(capsys, artifact: Path, tmp_path: Path) -> None:
    import json

    out_path = tmp_path / "cnn1d.onnx"
    code, out, err = _run(capsys, "export", str(artifact), "-o", str(out_path), "--json", "--quiet")
    assert code == 0 and err == "", err
    doc = json.loads(out)
    assert doc["onnx"]["path"] == str(out_path) and doc["onnx"]["file_bytes"] == out_path.stat().st_size
    assert "Gather" in doc["onnx"]["ops"] and doc["onnx"]["dense_file_bytes"] is None
    assert doc["report"]["stored_params"] == nesc.stored_params(nesc.load(artifact))


def test_the_old_onnx_flag_still_works(capsys, artifact: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "old.onnx"
    code, out, err = _run(capsys, "export", str(artifact), "--onnx", str(out_path))
    assert code == 0 and out_path.is_file()
    assert err.startswith("nesc: --onnx is deprecated; use -o/--out")
