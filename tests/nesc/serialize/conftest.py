"""Fixtures of the nesc.serialize tests: the two reference models, each saved once per session."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from nesc.serialize import save
from serialize_cases import ConvNet, trainable_model, traced, with_regenerate


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, tuple[fx.GraphModule, object]]:
    """{kind: (saved module in eval mode, path of its artifact)}, each model saved once per session."""
    out = {}
    for kind in ("plain", "regenerate"):
        torch.manual_seed(0)
        gm = traced(ConvNet())
        if kind == "regenerate":
            gm = with_regenerate(gm)
        path = tmp_path_factory.mktemp(kind) / "model.nesc"
        save(gm, path, extra={"report": {"ratio": 0.25, "layers": ["conv"]}})
        out[kind] = (gm.eval(), path)
    return out


@pytest.fixture(params=["plain", "regenerate"])
def saved(request, artifacts):
    return artifacts[request.param]


@pytest.fixture
def regenerate_file(artifacts):
    return artifacts["regenerate"][1]


@pytest.fixture(scope="session")
def trainable_artifacts(tmp_path_factory) -> dict[str, tuple[fx.GraphModule, object]]:
    """{kind: (trainable model in train mode, path of its artifact)}: plain learned starts and, "learner",
    with transformation learners; each saved once per session with ``nesc.save`` (plan, config, report)."""
    import nesc

    out = {}
    for kind in ("plain", "learner"):
        gm = trainable_model(learner=kind == "learner")
        path = tmp_path_factory.mktemp(f"trainable-{kind}") / "model.nesc"
        nesc.save(gm, path)
        out[kind] = (gm.train(), path)
    return out


@pytest.fixture
def learner_file(trainable_artifacts):
    return trainable_artifacts["learner"][1]
