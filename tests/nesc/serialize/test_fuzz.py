"""A bounded fuzz run of ``nesc.load`` (the long run is ``benchmarks/fuzz_loaders.py``): every mutated
artifact either raises the project's ``ArtifactError`` or loads a model that runs on its recorded inputs;
nothing else escapes, and loading opens no other file, starts no process and imports no new module."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from mutations import mutate
from nesc.core import inputs, names
from nesc.core.errors import ArtifactError
from nesc.serialize import load

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WATCHED = ("open", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "socket.connect")


class Recorder:
    """An audit hook (hooks cannot be removed: it records only while ``on``)."""

    def __init__(self) -> None:
        self.on, self.events, self.allowed = False, [], set()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.on:
            return
        if event == "import" and args[0] not in sys.modules:
            self.events.append((event, args[0]))
        elif event == "open":
            path, mode = str(args[0]), str(args[1] or "r")
            # The input itself, and Python sources read for tracebacks (linecache), are not side effects.
            source = path.endswith((".py", ".pyc")) and not set(mode) & set("wax+")
            if path not in self.allowed and not source:
                self.events.append((event, path[:200], mode))
        elif event in WATCHED:
            self.events.append((event, str(args[0])[:200]))


RECORDER = Recorder()


@pytest.fixture(scope="module")
def original(artifacts) -> bytes:
    path = artifacts["regenerate"][1]
    load(path)  # warm up: torch imports what a first load needs before anything is recorded
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_a_mutated_artifact_is_refused_or_loads_and_runs(original, tmp_path, seed) -> None:
    path = tmp_path / f"m{seed}.nesc"
    path.write_bytes(mutate(original, random.Random(seed)))
    RECORDER.allowed, RECORDER.events = {str(path)}, []
    RECORDER.on = True
    try:
        gm = load(path)
    except ArtifactError as e:
        assert not getattr(e, "unexpected", False), f"seed {seed}: a gap in the checks: {e.__cause__!r}"
        gm = None
    finally:
        RECORDER.on = False
    assert RECORDER.events == [], f"seed {seed}: side effects during load: {RECORDER.events}"
    if gm is not None:
        with torch.no_grad():
            gm(*inputs.from_specs(gm.meta[names.INPUT_SPECS]))
