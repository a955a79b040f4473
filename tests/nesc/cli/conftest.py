"""Setup shared by the command-line tests (one file per verb module of ``nesc/cli/``).

The test files here are named ``test_cli_<verb>.py``: without ``__init__.py`` files pytest imports a
test module by its file name, so ``test_train.py`` would clash with ``tests/nesc/test_train.py``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _pipe_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's fixed pipe width, whatever terminal runs pytest: no table wraps in these tests."""
    monkeypatch.delenv("COLUMNS", raising=False)
