"""What the command-line tests share: running ``nesc`` in-process and checking a clean error."""

from __future__ import annotations

import pytest

from nesc.cli import main


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``nesc ARGV``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(err: str, *fragments: str) -> None:
    """One ``error: ...`` message, no traceback, with every fragment in it."""
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
