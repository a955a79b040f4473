"""nesc.search.run: every strategy runs a real (tiny) search end to end; evaluations are cached by plan;
an interrupted search resumes to the same history; a run dir of another search is refused.

The evaluator is the real one: resnet_fmnist on the synthetic set (8x8 images), one fine-tune epoch
of a few steps per plan, about a second each."""

from __future__ import annotations

import json

import pytest

import nesc
from nesc.core.errors import ArtifactError, CheckpointError, ConfigError
from nesc.search import SearchConfig
from nesc.search.plan import read_plan

TINY = SearchConfig(evaluations=5, dense_epochs=1, epochs=1, progress=False, options={})


def _search(run_dir, **changes):
    options = {"warmup": 3, "steps": 20} if changes.get("strategy") in ("esnac", "embedding") else {}
    return nesc.search("resnet_fmnist", "synthetic", run_dir, TINY, **{"options": options, **changes})


@pytest.mark.parametrize("strategy", ["esnac", "embedding", "random"])
def test_each_strategy_finds_a_feasible_plan_within_its_evaluations(tmp_path, strategy) -> None:
    result = _search(tmp_path, strategy=strategy)
    assert len(result.history) == 5 and len({r["key"] for r in result.history}) == 5
    best = max(result.history, key=lambda r: r["reward"])
    assert result.best_record == best and best["feasible"] and 0 < best["acc"] <= 1
    assert read_plan(tmp_path / "best.json") == result.best
    for r in result.history:  # every plan at the budget: 1/4 of the dense size, within the planner's 2%
        assert abs(r["params"] - result.dense["params"] / 4) <= 0.03 * result.dense["params"] / 4
    if strategy == "esnac":
        assert (tmp_path / "esnac_embedding.safetensors").is_file()


def test_uniform_evaluates_its_one_plan_and_stops(tmp_path) -> None:
    result = _search(tmp_path, strategy="uniform")
    assert len(result.history) == 1
    assert {r.get("ratio") for r in result.best.layers.values()} - {None} and result.best.width == 1.0


def test_nothing_trains_twice(tmp_path, monkeypatch) -> None:
    first = _search(tmp_path, strategy="random", evaluations=3)
    (tmp_path / "history.json").unlink()  # the cache alone must answer
    calls = []
    from nesc.search import run  # not ``import nesc.search.run``: nesc.search is the function

    monkeypatch.setattr(run, "evaluate_plan", lambda *a: calls.append(a) or pytest.fail("trained again"))
    again = _search(tmp_path, strategy="random", evaluations=3)
    assert not calls and all(r["cached"] for r in again.history)
    assert [(r["key"], r["acc"]) for r in again.history] == [(r["key"], r["acc"]) for r in first.history]


def test_an_interrupted_search_resumes_to_the_same_history(tmp_path) -> None:
    whole = _search(tmp_path / "whole", strategy="esnac")
    _search(tmp_path / "parts", strategy="esnac", evaluations=3)  # "interrupted" after 3
    resumed = _search(tmp_path / "parts", strategy="esnac")
    assert [r["key"] for r in resumed.history] == [r["key"] for r in whole.history]
    assert [r["cached"] for r in resumed.history] == [False] * 5  # nothing re-ran: the first 3 came from history
    assert resumed.history[:3] == json.loads((tmp_path / "parts/history.json").read_text())["evaluations"][:3]


def test_a_run_dir_of_another_search_is_refused(tmp_path) -> None:
    _search(tmp_path, strategy="random", evaluations=1)
    with pytest.raises(CheckpointError, match="ratio"):
        _search(tmp_path, strategy="random", evaluations=1, ratio=3.0)


def test_a_tampered_history_is_refused(tmp_path) -> None:
    _search(tmp_path, strategy="random", evaluations=2)
    doc = json.loads((tmp_path / "history.json").read_text())
    doc["evaluations"][1]["key"] = "0" * 16
    (tmp_path / "history.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not a valid search history"):
        _search(tmp_path, strategy="random", evaluations=3)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="valid: embedding, esnac, random, uniform"):
        SearchConfig(strategy="bayes")
    with pytest.raises(ConfigError, match="evaluations"):
        SearchConfig(evaluations=0)
    with pytest.raises(ConfigError, match="ratio must be a finite number > 1"):
        SearchConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="widths"):
        SearchConfig(widths=(0.0,))
    with pytest.raises(ConfigError, match="did you mean 'evaluations'"):
        SearchConfig(evaluation=3)


def test_ray_without_ray_installed_is_a_clear_error(tmp_path) -> None:
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="Ray is not installed"):
        _search(tmp_path, strategy="random", evaluations=1, ray="auto")


@pytest.mark.slow
def test_local_worker_processes_give_the_same_results_as_inline(tmp_path) -> None:
    inline = _search(tmp_path / "a", strategy="random", evaluations=4)
    spawned = _search(tmp_path / "b", strategy="random", evaluations=4, workers=2)
    assert all(r["feasible"] for r in spawned.history) and len(spawned.history) == 4
    both = {r["key"]: r["acc"] for r in inline.history}
    common = [r for r in spawned.history if r["key"] in both]
    assert common  # the uniform plan comes first either way
    assert all(r["acc"] == pytest.approx(both[r["key"]], abs=1e-6) for r in common)  # same training in a worker
