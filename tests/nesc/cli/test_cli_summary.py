"""``nesc summary`` (``nesc/cli/summary.py``): a registry model's plan, config flags, bad input; an
artifact's summary is checked after ``compress`` in ``test_cli_compress.py``. Small models only."""

from __future__ import annotations

from pathlib import Path

import pytest

from nesc.cli import USAGE_ERROR
from cli_cases import run as _run, assert_clean_error as _assert_clean_error


def test_summary_registry_model(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "summary", "mlp", "--ratio", "4")
    assert code == 0, err
    lines = out.splitlines()
    rows = [line for line in lines if line.startswith("│")]
    assert rows and all(line[1:].split("│")[0].strip() for line in rows), out  # no wrapped continuation row
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


def test_a_failing_pass_is_named_in_the_error(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "summary", "mlp", "--ratio", "100000")
    assert code == USAGE_ERROR
    _assert_clean_error(err)
    assert "'PlanPools' pass after the following passes: ['Functionalize', 'FindWeights']" in err


@pytest.mark.parametrize("ratio, words", [
    ("1e9", ["ratio=1e+09", "535,818", "budget 0", "less than one parameter", "at most 535,818"]),  # was ZeroDivisionError
    ("inf", ["ratio must be a finite number >= 1", "got inf"]),
    ("nan", ["ratio must be a number >= 1", "got nan"]),
])
def test_an_absurd_ratio_exits_2_with_one_message(capsys: pytest.CaptureFixture, ratio: str, words: list[str]) -> None:
    code, out, err = _run(capsys, "summary", "mlp", "--ratio", ratio)
    assert code == USAGE_ERROR and out == ""
    _assert_clean_error(err)
    assert "ZeroDivisionError" not in err
    for word in words:
        assert word in err, err
