"""``nesc compress --dataset ... --trainable PATH`` writes the trained model before freezing as an artifact
that loads trainable, and ``--resume PATH`` trains on from it (``nesc/cli/compress.py``); a frozen artifact,
``--distill`` or ``--init`` with ``--resume`` are clean errors."""

from __future__ import annotations

import pytest
import torch

import nesc
from nesc.cli import USAGE_ERROR, main
from nesc.core.modules import EpitomeSampler
from cli_cases import assert_clean_error, run

MODEL = ["resnet_fmnist", "--dataset", "synthetic", "--width", "0.25", "--optimizer", "adamw", "--lr", "0.01",
         "--ratio", "2", "--min-params", "64", "--epochs", "1"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """(folder, trainable artifact, frozen artifact) of one compress run with --trainable."""
    folder = tmp_path_factory.mktemp("resume")
    code = main(["compress", *MODEL, "--run-dir", str(folder / "run"), "--out", str(folder / "frozen.nesc"),
                 "--trainable", str(folder / "trainable.nesc")])  # module scope: no capsys
    assert code == 0
    return folder, folder / "trainable.nesc", folder / "frozen.nesc"


def test_trainable_writes_the_model_before_freeze(first) -> None:
    _, trainable, frozen = first
    gm = nesc.load(trainable)
    assert any(isinstance(m, EpitomeSampler) for m in gm.modules())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # freezing the saved trainable model gives the saved frozen one
        assert torch.equal(nesc.freeze(gm)(x), nesc.load(frozen)(x))


def test_resume_trains_on_from_the_artifact(first, capsys, tmp_path) -> None:
    _, trainable, _ = first
    code, out, err = run(capsys, "compress", *MODEL, "--resume", str(trainable), "--run-dir", str(tmp_path / "run"),
                         "--out", str(tmp_path / "again.nesc"))
    assert code == 0, err
    assert f"resumed from {trainable}" in out and "vs dense" not in out
    assert not (tmp_path / "run" / "dense").exists()  # no dense model trained
    before = dict(nesc.load(trainable).named_parameters())
    resumed = nesc.load(tmp_path / "again.nesc")
    pools = [n for n in before if n.startswith("nesc_pool")]
    assert pools and any(not torch.equal(resumed.get_parameter(n), before[n]) for n in pools)  # it trained


def test_resume_starts_from_the_artifact(first, capsys, tmp_path) -> None:
    """At a learning rate of 1e-30 no pool value moves (its float32 spacing is ~1e-8): the pools after the
    resumed run are the artifact's, bit for bit, so training started from them."""
    _, trainable, _ = first
    code, _, err = run(capsys, "compress", *MODEL, "--lr", "1e-30", "--resume", str(trainable), "--run-dir",
                       str(tmp_path / "run"), "--out", str(tmp_path / "still.nesc"))
    assert code == 0, err
    want, got = nesc.load(trainable), nesc.load(tmp_path / "still.nesc")
    pools = [n for n, _ in want.named_parameters() if n.startswith("nesc_pool")]
    assert pools and all(torch.equal(got.get_parameter(n), want.get_parameter(n)) for n in pools)


@pytest.mark.parametrize("extra, words", [
    (["--distill"], "--distill"),
    (["--init", "dense.safetensors"], "--init"),
])
def test_resume_with_a_dense_model_flag_is_a_clean_error(first, capsys, tmp_path, extra, words) -> None:
    _, trainable, _ = first
    code, _, err = run(capsys, "compress", *MODEL, "--resume", str(trainable), *extra, "--run-dir",
                       str(tmp_path / "run"), "--out", str(tmp_path / "x.nesc"))
    assert code == USAGE_ERROR
    assert_clean_error(err, words, "--resume")


def test_resume_from_a_frozen_artifact_is_a_clean_error(first, capsys, tmp_path) -> None:
    _, _, frozen = first
    code, _, err = run(capsys, "compress", *MODEL, "--resume", str(frozen), "--run-dir", str(tmp_path / "run"),
                       "--out", str(tmp_path / "x.nesc"))
    assert code == USAGE_ERROR
    assert_clean_error(err, "a frozen model", "--trainable")
