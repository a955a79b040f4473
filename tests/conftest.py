"""Shared test setup: make ``import helpers`` work from every test folder.

Tolerances, reference computations and small models live in ``helpers.py`` (plain Python, importable
without pytest machinery), so that every test file compares against one definition of each.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# pytest puts tests/ on sys.path (rootdir-style imports, no __init__.py files). There, tests/nesc/
# would be imported as a namespace package "nesc" whenever the repository root is not on sys.path
# (plain ``pytest`` rather than ``python -m pytest``), so import the real package first.
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != TESTS]
import nesc.models  # noqa: E402,F401  (imports nesc, registers torch.ops.nesc.regenerate and the models)

sys.path[:] = _saved
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

try:  # hypothesis keeps a cache under ./.hypothesis; the tests write nothing outside tests/ and /tmp
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "nesc-tests-hypothesis")
except ImportError:  # pragma: no cover - hypothesis is a test extra
    pass
