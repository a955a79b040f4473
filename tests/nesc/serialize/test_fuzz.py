"""A bounded fuzz run of ``nesc.load`` (the long run is ``benchmarks/fuzz_loaders.py``): every mutated
artifact either raises the project's ``ArtifactError`` or loads a model that runs on its recorded inputs;
nothing else escapes, and loading opens no other file, starts no process and imports no new module."""

from __future__ import annotations

import random

import fuzz_helpers as fh
import pytest
import torch

from mutations import mutate
from nesc.core import inputs, names
from nesc.core.errors import ArtifactError
from nesc.serialize import load

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

@pytest.fixture(scope="module", params=["frozen", "trainable"])
def original(request, artifacts, trainable_artifacts) -> bytes:
    """A frozen model's artifact, and a trainable one's (format 5: samplers with learners, plan, config)."""
    path = artifacts["regenerate"][1] if request.param == "frozen" else trainable_artifacts["learner"][1]
    load(path)  # warm up: torch imports what a first load needs before anything is recorded
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_a_mutated_artifact_is_refused_or_loads_and_runs(original, tmp_path, seed) -> None:
    path = tmp_path / f"m{seed}.nesc"
    path.write_bytes(mutate(original, random.Random(seed)))
    with fh.audit([path]) as events:
        try:
            gm = load(path)
        except ArtifactError as e:
            assert not getattr(e, "unexpected", False), f"seed {seed}: a gap in the checks: {e.__cause__!r}"
            gm = None
    assert events == [], f"seed {seed}: side effects during load: {events}"
    if gm is not None:
        with torch.no_grad():
            gm(*inputs.from_specs(gm.meta[names.INPUT_SPECS]))
            gm.train()(*inputs.from_specs(gm.meta[names.INPUT_SPECS]))  # a trainable model trains too
