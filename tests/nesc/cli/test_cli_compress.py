"""``nesc compress`` without ``--dataset`` (``nesc/cli/compress.py``): output-path and checkpoint errors,
then compress a checkpoint, load the artifact and summarise it; ``--out`` is checked before any work
(an existing file needs ``--force``, a link, folder or pipe is never replaced). The ``--dataset`` path is tested with
``nesc train`` in ``test_cli_train.py`` (they share the synthetic set and its helpers)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import nesc
from nesc.cli import USAGE_ERROR
from nesc.cli import compress as compress_verb
from nesc.models import create_model, get_spec
from cli_cases import run as _run, assert_clean_error as _assert_clean_error

HAS_SERIALIZE = importlib.util.find_spec("nesc.serialize") is not None


def test_compress_out_folder_must_exist(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "compress", "cnn1d", "--out", str(tmp_path / "no" / "such" / "m.nesc"))
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "does not exist" in err


def test_compress_missing_checkpoint(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "compress", "cnn1d", "--init", str(tmp_path / "dense.pt"),
                        "--out", str(tmp_path / "m.nesc"))
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "dense.pt" in err


@pytest.mark.skipif(not HAS_SERIALIZE, reason="nesc.serialize (nesc.save / nesc.load) is not written yet")
def test_compress_then_summarise_artifact(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(123)
    dense = create_model("cnn1d")
    checkpoint = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), checkpoint)
    monkeypatch.chdir(tmp_path)  # the artifact's default place: ./<model>.nesc

    code, out, err = _run(capsys, "compress", "cnn1d", "--ratio", "3", "--init", str(checkpoint))
    assert code == 0, err
    artifact = tmp_path / "cnn1d.nesc"
    assert artifact.is_file()
    for expected in ("conv2.0.weight", "ratio:", "achieved", "reconstruction error", "dense float32", "time:",
                     f"{artifact.stat().st_size:,} bytes", "fit pools", "freeze", "save"):
        assert expected in out, expected

    loaded = nesc.load(artifact)
    assert loaded(*get_spec("cnn1d").example_inputs(2)).shape == (2, 10)
    # --init was used: the classifier stays dense (keep_classifier) and holds the checkpoint's weights.
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], dense.fc.weight.detach(), rtol=0, atol=0)

    code, out, err = _run(capsys, "summary", str(artifact))
    assert code == 0, err
    assert "conv2.0.weight" in out and "nesc_pool" in out

    code, _, err = _run(capsys, "summary", str(artifact), "--ratio", "8")
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "--ratio" in err and "saved artifact" in err


# ------------------------------------------------------------------- nothing is replaced silently


@pytest.fixture()
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model built means the output path was not checked before the work."""
    def started(*args, **kwargs):
        raise AssertionError("the work started before the output path was refused")

    monkeypatch.setattr(compress_verb, "create_model", started)
    monkeypatch.setattr(compress_verb, "load_data", started)


def _out_kinds(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    existing = tmp_path / "old.nesc"
    existing.write_bytes(b"keep me")
    (tmp_path / "link.nesc").symlink_to(existing)
    (tmp_path / "folder.nesc").mkdir()
    os.mkfifo(tmp_path / "pipe.nesc")
    return {
        "existing file": (existing, "already exists; pass overwrite=True (command line: --force)"),
        "symlink": (tmp_path / "link.nesc", "is a symbolic link"),
        "directory": (tmp_path / "folder.nesc", "is a directory"),
        "fifo": (tmp_path / "pipe.nesc", "is not a regular file"),
        "missing folder": (tmp_path / "no" / "m.nesc", "does not exist; create it first"),
        "file as folder": (existing / "m.nesc", "is a file, not a folder"),
    }


KINDS = ["existing file", "symlink", "directory", "fifo", "missing folder", "file as folder"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trained", [False, True], ids=["fitted", "trained"])
def test_compress_refuses_an_unsafe_out_before_any_work(capsys, tmp_path, no_work, kind, trained) -> None:
    path, words = _out_kinds(tmp_path)[kind]
    model = ["resnet_fmnist", "--dataset", "synthetic", "--run-dir", str(tmp_path / "run")] if trained else ["cnn1d"]
    code, out, err = _run(capsys, "compress", *model, "--out", str(path))
    assert code == USAGE_ERROR and out == ""
    _assert_clean_error(err)
    assert f"--out {str(path)!r}" in err and words in err
    assert len(err.strip().splitlines()) == 1, "one message"
    assert (tmp_path / "old.nesc").read_bytes() == b"keep me"


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_force_never_replaces_a_link_a_folder_or_a_device(capsys, tmp_path, no_work, kind) -> None:
    path, words = _out_kinds(tmp_path)[kind]
    code, _, err = _run(capsys, "compress", "cnn1d", "--out", str(path), "--force")
    assert code == USAGE_ERROR and words in err
    assert (tmp_path / "old.nesc").read_bytes() == b"keep me"


def test_compress_default_out_is_checked_too(capsys, tmp_path, monkeypatch, no_work) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cnn1d.nesc").write_bytes(b"an earlier run")
    code, _, err = _run(capsys, "compress", "cnn1d")
    assert code == USAGE_ERROR and "--out 'cnn1d.nesc' already exists" in err and "--force" in err


def test_force_is_passed_down_as_overwrite(capsys, tmp_path, monkeypatch) -> None:
    """``--force`` reaches ``nesc.save(..., overwrite=True)``; without it, ``overwrite=False``."""
    calls = []

    def fake_save(gm, path, *, overwrite=False):
        calls.append(overwrite)
        Path(path).write_bytes(b"artifact")

    monkeypatch.setattr(compress_verb, "save", fake_save)
    target = tmp_path / "m.nesc"
    assert _run(capsys, "compress", "cnn1d", "--out", str(target))[0] == 0
    assert _run(capsys, "compress", "cnn1d", "--out", str(target))[0] == USAGE_ERROR  # now it exists
    code, _, err = _run(capsys, "compress", "cnn1d", "--out", str(target), "--force")
    assert code == 0, err
    assert calls == [False, True]


@pytest.mark.skipif(not HAS_SERIALIZE, reason="nesc.serialize (nesc.save / nesc.load) is not written yet")
def test_force_replaces_an_existing_artifact(capsys, tmp_path) -> None:
    target = tmp_path / "m.nesc"
    target.write_bytes(b"old")
    code, _, err = _run(capsys, "compress", "cnn1d", "--out", str(target), "--force")
    assert code == 0, err
    assert nesc.load(target)(*get_spec("cnn1d").example_inputs(1)).shape == (1, 10)


def test_fold_batchnorm_writes_a_smaller_artifact_without_batch_norms(capsys, tmp_path) -> None:
    paths = {flag: tmp_path / f"m{len(flag)}.nesc" for flag in ((), ("--fold-batchnorm",))}
    for flag, path in paths.items():
        code, _, err = _run(capsys, "compress", "cnn1d", "--out", str(path), *flag)
        assert code == 0, err
    plain, folded = (nesc.load(p) for p in paths.values())
    assert paths[("--fold-batchnorm",)].stat().st_size < paths[()].stat().st_size
    assert any(k.endswith("running_var") for k in plain.state_dict())
    assert not any(k.endswith("running_var") for k in folded.state_dict())
    x = get_spec("cnn1d").example_inputs(3)
    torch.testing.assert_close(folded(*x), plain(*x), rtol=1e-5, atol=1e-6)


def test_pool_dtype_int8_stores_int8_pools_and_changes_outputs_by_their_rounding(capsys, tmp_path) -> None:
    paths = {flag: tmp_path / f"m{len(flag)}.nesc" for flag in ((), ("--pool-dtype", "int8"))}
    for flag, path in paths.items():
        code, _, err = _run(capsys, "compress", "cnn1d", "--out", str(path), *flag)
        assert code == 0, err
    plain, int8 = (nesc.load(p) for p in paths.values())
    pools = {n: b for n, b in int8.named_buffers() if n.startswith("nesc_pool")}
    assert {b.dtype for n, b in pools.items() if n.endswith(".values")} == {torch.int8}
    assert {b.dtype for n, b in pools.items() if n.endswith(".scale")} == {torch.float32}
    assert not [n for n, _ in int8.named_parameters() if n.startswith("nesc_pool")]
    assert nesc.stored_bytes(int8) < nesc.stored_bytes(plain)
    x = get_spec("cnn1d").example_inputs(3)
    with torch.no_grad():
        got, want = int8(*x), plain(*x)
    # int8 rounding of the pools: 0.4-0.5% of the output's norm on the registry models (tests/passes/test_quantize_pools)
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.02


def test_pool_dtype_names_the_choices_when_given_another(capsys) -> None:
    code, _, err = _run(capsys, "compress", "cnn1d", "--pool-dtype", "int4")
    assert code == USAGE_ERROR and "int8" in err and "bfloat16" in err


@pytest.mark.parametrize("flag", [["--strict-resume"], ["--no-resume"], ["--run-dir", "r"]])
def test_resume_flags_without_dataset_are_refused(capsys, flag) -> None:
    code, _, err = _run(capsys, "compress", "cnn1d", *flag)
    assert code == USAGE_ERROR and f"{flag[0]} only apply when training" in err


@pytest.mark.parametrize("ratio, words", [("1e9", ["ratio=1e+09", "less than one parameter", "at most"]),
                                          ("inf", ["ratio must be a finite number", "inf"])])
def test_an_absurd_ratio_is_one_clean_error(capsys, tmp_path, ratio, words) -> None:
    code, _, err = _run(capsys, "compress", "cnn1d", "--ratio", ratio, "--out", str(tmp_path / "m.nesc"))
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "ZeroDivisionError" not in err and all(w in err for w in words), err
    assert not (tmp_path / "m.nesc").exists()
