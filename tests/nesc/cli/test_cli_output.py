"""What the verbs print (``nesc/cli/output.py`` and the consoles of ``nesc/cli/common.py``): ``--json``
is one JSON document and nothing else on stdout; tables piped to a file never wrap a row; ``--quiet``
leaves stderr empty; ``summary --flops`` and nesc's MAdd column agree with ``torch.utils.flop_counter``
run on the eager dense model (the reference: FLOPs = 2 x MAdd for conv/linear). Small models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nesc.models import get_spec
from cli_cases import run as _run

BOX_ROW = "│"  # rich's vertical rule: every table row, and every wrapped continuation of one, starts with it


def _dense_madd(model: str, without: tuple = ()) -> int:
    """MAdd per example of the eager dense model, by torch's own counter (less the ops ``without``)."""
    spec = get_spec(model)
    torch.manual_seed(0)
    net = spec.create().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*spec.example_inputs(1))
    skipped = sum(n for op, n in counter.get_flop_counts()["Global"].items() if op in without)
    return (counter.get_total_flops() - skipped) // 2


def test_the_madd_column_leaves_out_matmuls_without_a_weight(capsys: pytest.CaptureFixture) -> None:
    """vit_tiny: attention's q @ k and attn @ v (bmm of activations) are not weight-bearing ops."""
    code, out, err = _run(capsys, "summary", "vit_tiny", "--json")
    assert code == 0, err
    madd = json.loads(out)["report"]["madd"]
    assert madd == _dense_madd("vit_tiny", without=(torch.ops.aten.bmm,)) < _dense_madd("vit_tiny")


@pytest.mark.parametrize("model", ["mlp", "resnet_fmnist"])
def test_summary_json_and_flops_match_torch_flop_counter(capsys: pytest.CaptureFixture, model: str) -> None:
    code, out, err = _run(capsys, "summary", model, "--ratio", "4", "--flops", "--json")
    assert code == 0, err
    doc = json.loads(out)  # the whole of stdout is one document
    reference = _dense_madd(model)
    # sampling replaces weights, not the work done with them: every MAdd of the dense model is counted
    assert doc["report"]["madd"] == reference
    assert doc["flop_counter"]["madd"] == reference
    assert doc["flop_counter"]["flops"] == 2 * reference
    assert doc["report"]["ratio"] == pytest.approx(doc["report"]["dense_params"] / doc["report"]["stored_params"])
    assert doc["report"]["rows"] and doc["input_shape"] == [1, *get_spec(model).input_shape]
    assert set(doc["seconds"]) >= {"capture", "plan", "fit pools", "freeze"}


def test_piped_tables_never_wrap(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "summary", "resnet_fmnist", "--ratio", "4", "--reuse")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith(BOX_ROW)]
    # a continuation line has an empty first cell: "│          │ ..."
    wrapped = [line for line in rows if line[1:].split(BOX_ROW)[0].strip() == ""]
    assert rows and not wrapped, out
    code, out_json, _ = _run(capsys, "summary", "resnet_fmnist", "--ratio", "4", "--reuse", "--json")
    for row in json.loads(out_json)["report"]["rows"]:  # every name and note whole, on its row's line
        assert any(row["name"] in line and row["reason"] in line for line in rows), row


def test_compress_json_and_quiet(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "m.nesc"
    code, out, err = _run(capsys, "compress", "mlp", "-o", str(path), "--json", "--quiet")
    assert code == 0 and err == "", err
    doc = json.loads(out)
    assert doc["artifact"] == str(path) and doc["file_bytes"] == path.stat().st_size
    assert doc["dense_float32_bytes"] == 4 * doc["report"]["dense_params"] > doc["file_bytes"]
    assert set(doc["seconds"]) >= {"build", "capture", "plan", "fit pools", "freeze", "save"}
    code, out, err = _run(capsys, "summary", str(path), "--json", "--flops")
    assert code == 0, err
    doc_artifact = json.loads(out)
    assert doc_artifact["file_bytes"] == path.stat().st_size
    assert doc_artifact["report"]["stored_params"] == doc["report"]["stored_params"]
    assert doc_artifact["flop_counter"]["madd"] == _dense_madd("mlp")


def test_without_json_the_tables_are_on_stdout(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, err = _run(capsys, "compress", "mlp", "-o", str(tmp_path / "m.nesc"))
    assert code == 0, err
    assert "fc1.weight" in out and "artifact:" in out and not out.lstrip().startswith("{")


def test_trained_compress_json_then_plot_its_run(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path, run_dir = tmp_path / "m.nesc", tmp_path / "run"
    code, out, err = _run(capsys, "compress", "resnet_fmnist", "--dataset", "synthetic", "--epochs", "1",
                          "--limit", "64", "--run-dir", str(run_dir), "-o", str(path), "--json", "--quiet")
    assert code == 0 and err == "", err  # --quiet: the training bars too
    doc = json.loads(out)
    assert doc["file_bytes"] == path.stat().st_size and doc["run_dir"] == str(run_dir)
    assert doc["nesc"]["stored_params"] == doc["report"]["stored_params"] < doc["dense"]["stored_params"]
    assert [row["epoch"] for row in doc["nesc"]["history"]] == [1]
    code, out, err = _run(capsys, "plot", str(run_dir))  # its dense/ and nesc/ logs
    assert code == 0 and (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG"), err
