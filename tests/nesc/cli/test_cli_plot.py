"""``nesc plot`` (``nesc/cli/plot.py``): a run folder's curves (its own metrics.json and its sub-folders'),
an artifact's per-layer bars, each saved as a PNG of the figure's size; damaged or missing logs are one
clean error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nesc
from nesc.cli import USAGE_ERROR
from nesc.cli import plot as plot_verb
from nesc.models import get_spec
from cli_cases import run as _run, assert_clean_error

pytest.importorskip("matplotlib", reason="the data extra is not installed: pip install 'nesc[data]'")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log(folder: Path, epochs: int) -> None:
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "test_loss": 1.0, "test_acc": 0.5 + e / 100,
             "lr": 0.1, "seconds": float(e)} for e in range(1, epochs + 1)]
    (folder / "metrics.json").write_text(json.dumps(rows))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_plot_a_compress_run_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _log(run_dir / "dense", 3)
    _log(run_dir / "nesc", 2)
    code, out, err = _run(capsys, "plot", str(run_dir))
    assert code == 0, err
    assert _png_size(run_dir / "curves.png") == (1200, 480)  # figsize (10, 4) at 120 dpi
    assert str(run_dir / "curves.png") in out
    code, _, err = _run(capsys, "plot", str(run_dir))  # the default output exists now: --force to replace it
    assert code == USAGE_ERROR and "--force" in err


@pytest.mark.parametrize("content, words", [
    ("not json", "not a training log"),
    ("[]", "non-empty list"),
    ('[{"epoch": 1, "test_acc": "high", "train_loss": 0.1}]', "numeric epoch, test_acc, train_loss"),
])
def test_a_damaged_log_is_one_clean_error(capsys, tmp_path: Path, content: str, words: str) -> None:
    (tmp_path / "metrics.json").write_text(content)
    code, _, err = _run(capsys, "plot", str(tmp_path), "-o", str(tmp_path / "p.png"))
    assert code == USAGE_ERROR
    assert_clean_error(err, words)
    assert not (tmp_path / "p.png").exists()


def test_a_folder_without_logs_or_a_missing_path(capsys, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "plot", str(tmp_path))
    assert code == USAGE_ERROR and "no metrics.json" in err
    code, _, err = _run(capsys, "plot", str(tmp_path / "nope"))
    assert code == USAGE_ERROR and "no such run folder" in err
    code, _, err = _run(capsys, "plot")
    assert code == USAGE_ERROR and "needs RUN_DIR_OR_ARTIFACT" in err


def test_plot_an_artifact(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure of a frozen mlp (nesc.save and nesc.load are tested in tests/nesc/serialize)."""
    torch.manual_seed(0)
    spec = get_spec("mlp")
    frozen = nesc.freeze(nesc.transform(spec.create(), spec.example_inputs(1)))
    artifact = tmp_path / "m.nesc"
    artifact.write_bytes(b"read by the stub")
    monkeypatch.setattr(plot_verb, "load", lambda path: frozen if Path(path) == artifact else None)
    code, out, err = _run(capsys, "plot", str(artifact))
    assert code == 0, err
    width, height = _png_size(tmp_path / "m.png")
    assert (width, height) == (720, 960)  # 3 layers: the minimum width, 6 x 8 inches at 120 dpi
