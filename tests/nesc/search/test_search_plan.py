"""nesc.search.plan: the plan file round-trips, its key is the hash of its canonical JSON, and the
schema rejects every malformed document with an ArtifactError naming the field."""

from __future__ import annotations

import json

import pytest

from nesc.core.config import LayerConfig
from nesc.core.errors import ArtifactError
from nesc.search.plan import MAX_BYTES, Plan, from_json, read_plan

LAYERS = {"a.weight": "dense", "b.weight": {"ratio": 3.5}, "c.weight": {"pool": "s1"}, "d.weight": {}}


def _doc(**changes) -> dict:
    doc = Plan("resnet_fmnist", 1000, dict(LAYERS)).to_json()
    doc.update(changes)
    return doc


def test_a_plan_round_trips_through_its_file(tmp_path) -> None:
    plan = Plan("resnet_fmnist", 1000, dict(LAYERS), width=1.5, min_params=64)
    back = read_plan(plan.save(tmp_path / "best.json"))
    assert back == plan and back.key == plan.key


def test_the_key_ignores_layer_order_and_changes_with_any_value() -> None:
    plan = Plan("resnet_fmnist", 1000, dict(LAYERS))
    assert Plan("resnet_fmnist", 1000, dict(reversed(list(LAYERS.items())))).key == plan.key
    assert Plan("resnet_fmnist", 1001, dict(LAYERS)).key != plan.key
    assert Plan("resnet_fmnist", 1000, {**LAYERS, "b.weight": {"ratio": 3.6}}).key != plan.key


def test_nes_config_expresses_every_rule() -> None:
    config = Plan("resnet_fmnist", 1000, dict(LAYERS)).nes_config()
    assert config.param_budget == 1000 and config.ratio is None and not config.keep_first
    assert config.overrides == {"a.weight": None, "b.weight": LayerConfig(ratio=3.5),
                                "c.weight": LayerConfig(pool="s1"), "d.weight": LayerConfig()}


@pytest.mark.parametrize("doc, field", [
    ([], "the document"),
    (_doc(extra=1), "'extra'"),
    ({k: v for k, v in _doc().items() if k != "layers"}, "'layers'"),
    (_doc(format="nesc"), "format/version"),
    (_doc(version=2), "format/version"),
    (_doc(model="../../etc"), "model"),
    (_doc(param_budget=0), "param_budget"),
    (_doc(param_budget=True), "param_budget"),
    (_doc(param_budget=10.5), "param_budget"),
    (_doc(min_params=-1), "min_params"),
    (_doc(width=0), "width"),
    (_doc(width=100), "width"),
    (_doc(layers=[]), "layers"),
    (_doc(layers={"a b": "dense"}), "layer name"),
    (_doc(layers={"a.weight": "sparse"}), "layers\\['a.weight'\\]"),
    (_doc(layers={"a.weight": {"ratio": 0.5}}), "ratio"),
    (_doc(layers={"a.weight": {"ratio": "4"}}), "ratio"),
    (_doc(layers={"a.weight": {"ratio": 2, "pool": "s1"}}), "layers\\['a.weight'\\]"),
    (_doc(layers={"a.weight": {"pool": "s 1"}}), "pool"),
    (_doc(layers={"a.weight": {"shape": [1, 2]}}), "layers\\['a.weight'\\]"),
])
def test_the_schema_rejects_a_malformed_plan(doc, field) -> None:
    with pytest.raises(ArtifactError, match=field):
        from_json(doc)


def test_a_file_that_is_not_a_plan_is_refused(tmp_path) -> None:
    path = tmp_path / "p.json"
    for text, match in [("{", "not valid JSON"), ('{"param_budget": NaN}', "not valid JSON"),
                        (" " * (MAX_BYTES + 1), "larger than"), (json.dumps(_doc(width=-1)), "width")]:
        path.write_text(text)
        with pytest.raises(ArtifactError, match=match):
            read_plan(path)
    with pytest.raises(ArtifactError, match="cannot read"):
        read_plan(tmp_path / "missing.json")
