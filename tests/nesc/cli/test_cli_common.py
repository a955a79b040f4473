"""The ``nesc`` command line as a whole (``nesc/cli/__init__.py`` and ``common.py``): ``--version``,
usage errors, unknown model names, ``nesc models`` and the installed script, ``python -m nesc.cli``.

Run in-process through ``main(argv)``, except for the script and ``-m`` checks. Output goes through
rich; with $COLUMNS unset and no terminal, the CLI prints at its fixed pipe width.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nesc
from nesc.cli import USAGE_ERROR
from nesc.models import list_models
from cli_cases import run as _run, assert_clean_error as _assert_clean_error


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


def test_python_dash_m_runs_the_same_command_line() -> None:
    """``python -m nesc.cli`` (the package's ``__main__.py``) lists every verb."""
    result = subprocess.run([sys.executable, "-m", "nesc.cli", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    for verb in ("models", "summary", "compress", "compile", "train", "export"):
        assert verb in result.stdout


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
