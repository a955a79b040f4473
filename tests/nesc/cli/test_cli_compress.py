"""``nesc compress`` without ``--dataset`` (``nesc/cli/compress.py``): output-path and checkpoint errors,
then compress a checkpoint, load the artifact and summarise it. The ``--dataset`` path is tested with
``nesc train`` in ``test_cli_train.py`` (they share the synthetic set and its helpers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import nesc
from nesc.cli import USAGE_ERROR, main
from nesc.models import create_model, get_spec

HAS_SERIALIZE = importlib.util.find_spec("nesc.serialize") is not None


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(err: str) -> None:
    assert err.startswith("error: "), err
    assert "Traceback" not in err


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
