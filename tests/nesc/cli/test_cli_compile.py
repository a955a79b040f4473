"""``nesc compile`` (``nesc/cli/compile.py``): ``-o`` and the parameters file next to it are checked before
any work (an existing file needs ``--force``; a link, folder or pipe is never replaced) and ``--force``
reaches ``CompiledModel.export_library`` as ``overwrite=True``. Building with TVM is tested in
``tests/backends/test_tvm_build.py``; nothing here compiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nesc
from nesc.cli import USAGE_ERROR
from nesc.cli import compile as compile_verb

pytest.importorskip("tvm", reason="the tvm extra is not installed: pip install 'nesc[tvm]'")
from nesc.backends.tvm.runtime import params_path  # noqa: E402  (needs the extra)
from cli_cases import run as _run


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before -o/--out was refused")


@pytest.fixture()
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compile_verb, "transform", _no_work)
    monkeypatch.setattr(compile_verb, "load", _no_work)
    monkeypatch.setattr(compile_verb, "tvm_compile", _no_work)


def _assert_refused(code: int, out: str, err: str, *words: str) -> None:
    assert code == USAGE_ERROR and out == ""
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_an_existing_library_needs_force(capsys, tmp_path: Path, no_work) -> None:
    library = tmp_path / "m.so"
    library.write_bytes(b"an older build")
    _assert_refused(*_run(capsys, "compile", "mlp", "-o", str(library)),
                    f"-o/--out {str(library)!r} already exists", "--force")
    assert library.read_bytes() == b"an older build"


def test_an_existing_parameters_file_needs_force_too(capsys, tmp_path: Path, no_work) -> None:
    library = tmp_path / "m.so"
    params_path(library).write_bytes(b"older parameters")
    _assert_refused(*_run(capsys, "compile", "mlp", "-o", str(library)),
                    "-o/--out's parameters file", str(params_path(library)), "already exists", "--force")


@pytest.mark.parametrize("kind, words", [("symlink", "symbolic link"), ("fifo", "not a regular file"),
                                         ("directory", "is a directory")])
def test_force_never_replaces_a_link_a_pipe_or_a_folder(capsys, tmp_path: Path, no_work, kind, words) -> None:
    library = tmp_path / "m.so"
    real = tmp_path / "real.so"
    real.write_bytes(b"keep")
    if kind == "symlink":
        library.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(library)
    else:
        library.mkdir()
    _assert_refused(*_run(capsys, "compile", "mlp", "-o", str(library), "--force"), words)
    assert real.read_bytes() == b"keep"


def test_a_missing_folder_is_refused(capsys, tmp_path: Path, no_work) -> None:
    _assert_refused(*_run(capsys, "compile", "mlp", "-o", str(tmp_path / "no" / "m.so")), "does not exist")


def test_force_reaches_export_library_as_overwrite(capsys, tmp_path: Path, monkeypatch) -> None:
    seen = []

    class Compiled:
        def export_library(self, path, *, overwrite=False):
            seen.append(overwrite)
            raise nesc.NescError("stop here")  # the flag is what this test checks

    monkeypatch.setattr(compile_verb, "tvm_compile", lambda *args, **kwargs: Compiled())
    library = tmp_path / "m.so"
    for flags in ([], ["--force"]):
        code, _, err = _run(capsys, "compile", "cnn1d", "-o", str(library), *flags)
        assert code == USAGE_ERROR and "stop here" in err
    library.write_bytes(b"old")
    code, _, err = _run(capsys, "compile", "cnn1d", "-o", str(library), "--force")
    assert code == USAGE_ERROR and "stop here" in err
    assert seen == [False, True, True]


def test_json_is_one_document_with_the_files_and_their_sizes(capsys, tmp_path: Path, monkeypatch) -> None:
    import json

    from nesc.backends.tvm.export import ExportedFiles

    class Compiled:  # what tvm_compile returns, without building: the JSON is what this test checks
        tuning, param_bytes = None, 6

        def export_library(self, path, *, overwrite=False):
            path.write_bytes(b"lib")
            params_path(path).write_bytes(b"params")
            return ExportedFiles(path, params_path(path))

        def bytes_by_kind(self):
            return {"pool": 6}

    monkeypatch.setattr(compile_verb, "tvm_compile", lambda *args, **kwargs: Compiled())
    library = tmp_path / "m.so"
    code, out, err = _run(capsys, "compile", "cnn1d", "-o", str(library), "--json", "--quiet")
    assert code == 0 and err == "", err
    doc = json.loads(out)
    assert (doc["library"], doc["library_bytes"]) == (str(library), 3)
    assert (doc["params"], doc["params_bytes"]) == (str(params_path(library)), 6)
    assert doc["param_bytes_by_kind"] == {"pool": 6} and doc["tuning"] is None
    assert doc["dense_float32_bytes"] == 4 * doc["report"]["dense_params"]
    assert set(doc["seconds"]) >= {"capture", "plan", "fit pools", "freeze", "compile", "export"}
