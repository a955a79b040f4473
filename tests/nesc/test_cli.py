"""The ``nesc`` command line, run in-process through ``main(argv)`` and once as the installed script.

Small registry models only (``mlp``, ``cnn1d``). Output goes through rich; with $COLUMNS unset and no
terminal, the CLI prints at its fixed pipe width, so the tables are never wrapped in these tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nesc
from nesc.cli import PIPE_WIDTH, USAGE_ERROR, main
from nesc.models import create_model, get_spec, list_models

HAS_SERIALIZE = importlib.util.find_spec("nesc.serialize") is not None


@pytest.fixture(autouse=True)
def _pipe_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # the fixed pipe width, whatever terminal runs pytest


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(err: str) -> None:
    assert err.startswith("error: "), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ basic verbs


def test_version(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"nesc {nesc.__version__} (torch {torch.__version__})"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys)
    assert code == USAGE_ERROR
    assert "COMMAND" in err


def test_models_console_script() -> None:
    """The installed entry point (pyproject's [project.scripts]), not just the function."""
    script = Path(sys.executable).with_name("nesc")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}; run `pip install -e .`")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([str(script), "models"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in list_models():
        assert name in result.stdout
    assert "11,173,962" in result.stdout  # resnet18_cifar's parameter count
    assert "3x32x32" in result.stdout  # its input shape


# ---------------------------------------------------------------------------------------- summary


def test_summary_registry_model(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "summary", "mlp", "--ratio", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert max(map(len, lines)) <= PIPE_WIDTH
    # One table row per weight, unwrapped: name, op and shape on one line.
    assert any("fc1.weight" in line and "linear" in line and "512x784" in line and "nesc_pool" in line
               for line in lines), out
    assert "535,818 ->" in out  # the table title: dense -> stored parameters
    assert "plan notes" in out
    assert "reconstruction error" in out and "mean" in out and "max" in out


def test_summary_config_flags(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "summary", "cnn1d", "--params", "10000", "--policy", "global",
                          "--min-params", "100", "--input-size", "1", "64")
    assert code == 0, err
    assert "budget 10,000 params" in out and "policy global" in out
    assert "input 1x1x64" in out
    assert "1 pools" in out  # global policy: one pool for every compressed layer


def test_bad_ratio_exits_2_without_traceback(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "summary", "mlp", "--ratio", "0.5")
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "ratio" in err and "0.5" in err
    assert out == ""


@pytest.mark.parametrize("verb", ["summary", "compress"])
def test_unknown_model_lists_valid_names(capsys: pytest.CaptureFixture, verb: str) -> None:
    code, _, err = _run(capsys, verb, "resnet19")
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "'resnet19'" in err
    for name in list_models():
        assert name in err
    assert "did you mean 'resnet18'" in err


@pytest.mark.parametrize("argv", [
    ["summary", "mlp", "--ratio", "four"],  # not a number
    ["summary", "mlp", "--ratio", "4", "--params", "1000"],  # exclusive budgets
    ["summary", "mlp", "--policy", "per_block"],  # not a policy
    ["compress", "mlp", "--bogus"],
])
def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == USAGE_ERROR
    assert "usage: nesc" in err


def test_input_size_of_wrong_rank(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "summary", "cnn1d", "--input-size", "3", "32", "32")
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "--input-size 3 32 32" in err and "--input-size 1 40" in err


def test_missing_artifact(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "summary", str(tmp_path / "absent.nesc"))
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "absent.nesc" in err


# --------------------------------------------------------------------------------------- compress


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
