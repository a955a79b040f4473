"""nesc search on the command line, and its result through ``nesc compress --plan`` (the round trip)."""

from __future__ import annotations

import json
import math

import pytest

import nesc
from nesc.cli import main
from nesc.search.plan import Plan, read_plan

SEARCH = ["search", "resnet_fmnist", "--dataset", "synthetic", "--strategy", "random", "--evaluations", "2",
          "--dense-epochs", "1", "--epochs", "1"]


def test_search_then_compress_with_the_plan(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(SEARCH + ["--run-dir", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert "best plan:" in text and "2 plans" in text
    plan = read_plan(tmp_path / "s" / "best.json")
    out = tmp_path / "m.nesc"
    assert main(["compress", "resnet_fmnist", "--plan", str(tmp_path / "s" / "best.json"), "--dataset", "synthetic",
                 "--epochs", "1", "--out", str(out), "--run-dir", str(tmp_path / "c")]) == 0
    frozen = nesc.load(out)
    assert abs(nesc.stored_params(frozen) - plan.param_budget) <= 0.02 * plan.param_budget
    rows = {row.name: row for row in nesc.summary(frozen, print_table=False).rows}
    shared: dict[str, set[str]] = {}
    for name, rule in plan.layers.items():  # every rule of the plan is what the artifact holds
        row = rows[name]
        if rule == "dense":
            assert row.state == "dense"
        elif "pool" in rule:
            shared.setdefault(rule["pool"], set()).add(row.pool)
        elif "ratio" in rule:
            assert row.state != "dense" and row.shares_with == 0
            assert math.prod(row.pool_shape) == pytest.approx(row.params / rule["ratio"], rel=0.15)
    assert all(len(pools) == 1 for pools in shared.values())


@pytest.mark.parametrize("extra, match", [(["--ratio", "3"], "drop --ratio"), (["--policy", "global"], "drop --policy")])
def test_compress_refuses_budget_flags_with_a_plan(capsys, tmp_path, extra, match) -> None:
    path = tmp_path / "p.json"
    Plan("resnet_fmnist", 1000, {}).save(path)
    assert main(["compress", "resnet_fmnist", "--plan", str(path), "--out", str(tmp_path / "m.nesc")] + extra) == 2
    assert match in capsys.readouterr().err


def test_compress_refuses_a_malformed_or_foreign_plan(capsys, tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "nesc-plan", "version": 1}))
    assert main(["compress", "resnet_fmnist", "--plan", str(path), "--out", str(tmp_path / "m.nesc")]) == 2
    assert "must be present" in capsys.readouterr().err
    Plan("cnn1d", 1000, {}).save(path)
    assert main(["compress", "resnet_fmnist", "--plan", str(path), "--out", str(tmp_path / "m.nesc")]) == 2
    assert "searched for model cnn1d" in capsys.readouterr().err
