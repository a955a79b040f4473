"""``nesc train`` (``nesc/cli/train.py``) and ``nesc compress --dataset`` (``nesc/cli/compress.py``),
in-process through ``main(argv)``, on the synthetic set with a narrow ``resnet_fmnist`` (its global
pooling takes the 1x8x8 synthetic images)."""

from __future__ import annotations

import json
import re

import pytest

import nesc
from nesc.cli import USAGE_ERROR, main
from nesc.data import load_dataset
from nesc.models import get_spec
from nesc.train import evaluate

MODEL = ["resnet_fmnist", "--dataset", "synthetic", "--width", "0.25", "--optimizer", "adamw", "--lr", "0.01"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _accuracy(text: str, row: str) -> float:
    match = re.search(rf"│ {re.escape(row)}\s*│\s*([\d.]+)%", text)
    assert match, f"no {row!r} row in:\n{text}"
    return float(match.group(1)) / 100


def test_train_writes_weights_logs_and_a_report(capsys, tmp_path) -> None:
    code, out, err = _run(capsys, "train", *MODEL, "--epochs", "2", "--run-dir", str(tmp_path))
    assert code == 0, err
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert _accuracy(out, "dense") == pytest.approx(rows[-1]["test_acc"], abs=1e-4)
    model = get_spec("resnet_fmnist").create(num_classes=4, width_mult=0.25)
    nesc.load_checkpoint(model, tmp_path / "model.safetensors")
    _, acc = evaluate(model, load_dataset("synthetic"))
    assert acc == pytest.approx(rows[-1]["test_acc"])
    # The same command again resumes from the last checkpoint: nothing left to train, same result.
    code, again, _ = _run(capsys, "train", *MODEL, "--epochs", "2", "--run-dir", str(tmp_path))
    assert code == 0 and _accuracy(again, "dense") == _accuracy(out, "dense")


def test_compress_trains_freezes_saves_and_compares_with_dense(capsys, tmp_path) -> None:
    artifact = tmp_path / "r.nesc"
    code, out, err = _run(capsys, "compress", *MODEL, "--width", "0.5", "--ratio", "2", "--min-params", "64",
                          "--epochs", "2", "--distill", "--run-dir", str(tmp_path / "run"), "--out", str(artifact))
    assert code == 0, err
    assert "nesc (frozen)" in out and "vs dense" in out
    frozen = nesc.load(artifact)
    _, acc = evaluate(frozen, load_dataset("synthetic"))
    assert _accuracy(out, "nesc (frozen)") == pytest.approx(acc, abs=1e-4)
    assert json.loads((tmp_path / "run" / "dense" / "metrics.json").read_text())[-1]["epoch"] == 2
    assert json.loads((tmp_path / "run" / "nesc" / "metrics.json").read_text())[-1]["epoch"] == 2
    ratio = float(re.search(r"ratio: ([\d.]+)x", out).group(1))
    assert ratio == pytest.approx(2, rel=0.03)


def test_compress_from_a_trained_checkpoint_reports_its_accuracy(capsys, tmp_path) -> None:
    code, out, _ = _run(capsys, "train", *MODEL, "--epochs", "1", "--run-dir", str(tmp_path / "dense"))
    assert code == 0
    dense_acc = _accuracy(out, "dense")
    code, out, err = _run(capsys, "compress", *MODEL, "--ratio", "2", "--min-params", "64", "--epochs", "1",
                          "--init", str(tmp_path / "dense" / "model.safetensors"),
                          "--run-dir", str(tmp_path / "c"), "--out", str(tmp_path / "c.nesc"))
    assert code == 0, err
    assert _accuracy(out, "dense") == pytest.approx(dense_acc, abs=1e-4)
    assert not (tmp_path / "c" / "dense").exists()  # evaluated, not retrained


@pytest.mark.parametrize(("argv", "match"), [
    (["train", "resnet_fmnist"], "nesc train needs --dataset NAME; valid: digits, fashion_mnist"),
    (["train", "cnn1d", "--dataset", "synthetic"], r"takes inputs of shape \(1, 40\).*has \(1, 8, 8\).*resnet_fmnist"),
    (["train", "mlp", "--dataset", "synthetic", "--width", "0.5"], "model mlp has no width multiplier"),
    (["train", "resnet_fmnist", "--dataset", "synthetic", "--epochs", "0"], "epochs must be an int >= 1"),
    (["compress", "mlp", "--epochs", "3"], "--epochs only apply when training: add --dataset"),
    (["train", "resnet_fmnist", "--dataset", "fashion_mnist", "--data-dir", "/nonexistent"],
     "apt-get install dataset-fashion-mnist"),
])
def test_bad_input_is_one_clean_error(capsys, argv, match) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == USAGE_ERROR
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err), err


def test_unknown_dataset_is_a_usage_error(capsys) -> None:
    code, _, err = _run(capsys, "train", "resnet_fmnist", "--dataset", "cifar")
    assert code == USAGE_ERROR and "invalid choice: 'cifar'" in err


def test_train_uses_the_requested_seed(capsys, tmp_path) -> None:
    code, _, _ = _run(capsys, "train", *MODEL, "--epochs", "1", "--seed", "3", "--run-dir", str(tmp_path))
    assert code == 0
    assert json.loads((tmp_path / "checkpoint.json").read_text())["config"]["seed"] == 3
