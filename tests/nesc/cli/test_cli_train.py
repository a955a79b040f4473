"""``nesc train`` (``nesc/cli/train.py``) and ``nesc compress --dataset`` (``nesc/cli/compress.py``),
in-process through ``main(argv)``, on the synthetic set with a narrow ``resnet_fmnist`` (its global
pooling takes the 1x8x8 synthetic images). Bad input (a model that does not run on the dataset, a run
folder that is a file, a link where the weights go) is refused before any training."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nesc
from nesc.cli import USAGE_ERROR, common
from nesc.cli import train as train_verb
from nesc.data import load_dataset
from nesc.models import get_spec
from nesc.train import TrainResult, evaluate
from cli_cases import run as _run

MODEL = ["resnet_fmnist", "--dataset", "synthetic", "--width", "0.25", "--optimizer", "adamw", "--lr", "0.01"]


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
    (["train", "resnet_fmnist", "--dataset", "synthetic", "--width", "0"],
     "--width: the width multiplier must be a positive number; got 0"),
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
    (document,) = tmp_path.glob("checkpoint*.json")  # one epoch: one checkpoint document
    assert json.loads(document.read_text())["config"]["seed"] == 3


# ------------------------------------------------------ bad input refused before any training


def test_a_model_that_cannot_run_on_the_dataset_is_refused_before_training(capsys, tmp_path, monkeypatch) -> None:
    """mlp's input channels match digits' (1), but its first layer wants 28x28 and digits are 8x8:
    the trial forward on one sample catches what the channel check cannot."""
    monkeypatch.setattr(train_verb, "fit", _no_training)
    code, out, err = _run(capsys, "train", "mlp", "--dataset", "digits", "--run-dir", str(tmp_path))
    assert code == USAGE_ERROR and out == ""
    assert err.startswith("error: ") and "Traceback" not in err and "RuntimeError" not in err
    assert "model mlp (inputs of shape (1, 28, 28))" in err and "digits (samples of shape (1, 8, 8))" in err
    assert "the forward fails" in err and "784" in err  # what went wrong, in torch's words
    fits = err.split("Models that fit digits: ")[1].strip().split(", ")
    assert "resnet_fmnist" in fits and "mlp" not in fits and "cnn1d" not in fits


def test_the_trial_forward_leaves_the_model_in_training_mode_and_its_statistics_alone() -> None:
    from nesc.cli.common import build_model
    from nesc.cli import build_parser

    args = build_parser().parse_args(["train", "resnet_fmnist", "--dataset", "synthetic", "--width", "0.25"])
    model = build_model(args, get_spec("resnet_fmnist"), load_dataset("synthetic"), seed=0)
    assert model.training
    fresh = get_spec("resnet_fmnist").create(num_classes=4, width_mult=0.25)
    for (name, a), b in zip(model.named_buffers(), fresh.buffers()):
        assert torch.equal(a, b), f"{name} moved during the trial forward"


@pytest.mark.parametrize("verb", ["train", "compress"])
def test_a_run_dir_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, monkeypatch, verb) -> None:
    monkeypatch.setattr(common, "load_dataset", _no_training)
    (tmp_path / "file").write_text("not a folder")
    for run_dir, words in [(tmp_path / "file", "is a file, not a folder"),
                           (tmp_path / "file" / "sub", f"is inside {str(tmp_path / 'file')!r}, which is a file")]:
        out = ["--out", str(tmp_path / "m.nesc")] if verb == "compress" else []
        code, _, err = _run(capsys, verb, *MODEL, "--run-dir", str(run_dir), *out)
        assert code == USAGE_ERROR, err
        assert err.startswith(f"error: --run-dir {str(run_dir)!r}") and words in err and "Traceback" not in err


def test_a_link_where_the_weights_go_is_refused_before_training(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_verb, "fit", _no_training)
    (tmp_path / "elsewhere").write_bytes(b"keep")
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "elsewhere")
    code, _, err = _run(capsys, "train", *MODEL, "--run-dir", str(tmp_path))
    assert code == USAGE_ERROR and "the weights file" in err and "symbolic link" in err
    assert (tmp_path / "elsewhere").read_bytes() == b"keep"


# ---------------------------------------------------------------------------- resume flags


@pytest.mark.parametrize("flags, want", [([], {"resume": True}), (["--no-resume"], {"resume": False}),
                                         (["--strict-resume"], {"resume": True, "strict_resume": True})])
def test_resume_flags_reach_fit(capsys, tmp_path, monkeypatch, flags, want) -> None:
    """``--strict-resume`` is passed as ``strict_resume=True`` only when given (so the verb runs on a
    ``fit`` that does not know the keyword yet)."""
    seen = []

    def fake_fit(model, ds, config, *, out_dir, **kwargs):
        seen.append(kwargs)
        return TrainResult(0.5, 1.0, 10, 40, None, 0.0, 1)

    monkeypatch.setattr(train_verb, "fit", fake_fit)
    code, _, err = _run(capsys, "train", *MODEL, "--run-dir", str(tmp_path), *flags)
    assert code == 0, err
    assert seen == [want]
    assert (tmp_path / "model.safetensors").is_file()


def test_strict_resume_and_no_resume_exclude_each_other(capsys) -> None:
    code, _, err = _run(capsys, "train", *MODEL, "--no-resume", "--strict-resume")
    assert code == USAGE_ERROR and "not allowed with argument --no-resume" in err


def _no_training(*args, **kwargs):
    raise AssertionError("the work started before the bad input was refused")
