"""The NESConfig flags (``nesc/cli/config.py``), above all ``--params-of MODEL[@WIDTH]``: "wide at equal
size", a wide model compressed to the dense size of a narrow one. The budget is the narrow model's
parameter count (built here independently), the artifact stores that within the planner's tolerance,
every verb with the budget flags passes it on, and each bad value is one clean error before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

import nesc
from nesc.cli import USAGE_ERROR
from nesc.cli import compile as compile_verb
from nesc.cli import compress as compress_verb
from nesc.cli import export as export_verb
from nesc.cli import summary as summary_verb
from nesc.core.errors import InputError
from nesc.models import create_model
from nesc.passes.plan_pools import BUDGET_TOLERANCE
from nesc.report import build_report
from cli_cases import run as _run, assert_clean_error as _assert_clean_error

SYNTHETIC_CLASSES = 4  # nesc.data's synthetic set: 1x8x8 images, 4 classes
TRAINED = ["--dataset", "synthetic", "--optimizer", "adamw", "--lr", "0.01", "--epochs", "1", "--min-params", "64"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _one_clean_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == USAGE_ERROR and out == "", err
    _assert_clean_error(err, *fragments)
    assert len(err.strip().splitlines()) == 1, f"one message:\n{err}"


# ------------------------------------------------------------------------------ the budget it sets


def test_compress_to_the_size_of_a_narrower_model(capsys, tmp_path: Path) -> None:
    narrow = _params(create_model("cnn1d", width_mult=0.5))
    artifact = tmp_path / "m.nesc"
    code, out, err = _run(capsys, "compress", "cnn1d", "--params-of", "cnn1d@0.5", "--out", str(artifact))
    assert code == 0, err
    assert f"budget {narrow:,} params (= dense cnn1d at width 0.5)" in out
    stored = nesc.stored_params(nesc.load(artifact))
    assert abs(stored - narrow) <= BUDGET_TOLERANCE * narrow, (stored, narrow)

    code, out, err = _run(capsys, "summary", str(artifact), "--params-of", "cnn1d")
    _one_clean_error(code, out, err, "cannot apply --params-of", "saved artifact")


def test_wide_at_equal_size_on_a_dataset(capsys, tmp_path: Path) -> None:
    """A 2x-wide resnet_fmnist trained and compressed to the dense size of the 1x one, both built with the
    dataset's classes (4, not the factory's 10)."""
    narrow = _params(create_model("resnet_fmnist", num_classes=SYNTHETIC_CLASSES, width_mult=0.25))
    wide = _params(create_model("resnet_fmnist", num_classes=SYNTHETIC_CLASSES, width_mult=0.5))
    artifact = tmp_path / "wide.nesc"
    code, out, err = _run(capsys, "compress", "resnet_fmnist", *TRAINED, "--width", "0.5",
                          "--params-of", "resnet_fmnist@0.25", "--run-dir", str(tmp_path / "run"),
                          "--out", str(artifact))
    assert code == 0, err
    assert (f"resnet_fmnist at width 0.5 on synthetic, budget {narrow:,} params "
            f"(= dense resnet_fmnist at width 0.25)") in out
    assert f"{wide:,} ->" in out  # the report's title: the wide dense model's size -> stored
    stored = nesc.stored_params(nesc.load(artifact))
    assert abs(stored - narrow) <= BUDGET_TOLERANCE * narrow, (stored, narrow)


def _budget_reaching_transform(monkeypatch: pytest.MonkeyPatch, verb_module) -> list[int | None]:
    """Stop the verb at ``transform`` and record the budget it was given."""
    seen: list[int | None] = []

    def stop(model, inputs, config, **kwargs):
        seen.append(config.param_budget)
        raise InputError("stopped at transform")

    monkeypatch.setattr(verb_module, "transform", stop)
    return seen


@pytest.mark.parametrize("verb, module, extra", [
    ("summary", summary_verb, []),
    ("compress", compress_verb, ["--out", "OUT/m.nesc"]),
    ("compile", compile_verb, ["-o", "OUT/m.so"]),
    ("export", export_verb, ["-o", "OUT/m.onnx"]),
])
def test_every_verb_with_the_budget_flags_takes_params_of(capsys, tmp_path, monkeypatch, verb, module, extra) -> None:
    if verb == "compile":
        pytest.importorskip("tvm", reason="the tvm extra is not installed: pip install 'nesc[tvm]'")
    if verb == "export":
        pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'nesc[onnx]'")
    seen = _budget_reaching_transform(monkeypatch, module)
    extra = [a.replace("OUT", str(tmp_path)) for a in extra]
    code, _, err = _run(capsys, verb, "resnet_fmnist", "--params-of", "mobilenetv2_fmnist@0.25", *extra)
    assert code == USAGE_ERROR and "stopped at transform" in err, err
    assert seen == [_params(create_model("mobilenetv2_fmnist", width_mult=0.25))]


# ------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize("value, fragments", [
    ("cnn1e", ["--params-of cnn1e: unknown model 'cnn1e'", "did you mean 'cnn1d'?", "resnet_fmnist"]),
    ("cnn1d@wide", ["--params-of cnn1d@wide: WIDTH 'wide' is not a number", "e.g. cnn1d@0.5"]),
    ("cnn1d@", ["--params-of cnn1d@: WIDTH '' is not a number"]),
    ("cnn1d@0", ["--params-of cnn1d@0: the width multiplier must be a positive number; got 0"]),
    ("cnn1d@-0.5", ["--params-of cnn1d@-0.5: the width multiplier must be a positive number; got -0.5"]),
    ("cnn1d@inf", ["--params-of cnn1d@inf: the width multiplier must be a positive number; got inf"]),
    ("mlp@0.5", ["--params-of mlp@0.5: model mlp has no width multiplier; drop @0.5",
                 "models with one: cnn1d, mobilenetv2"]),
])
def test_a_bad_params_of_is_one_clean_error(capsys, monkeypatch, value, fragments) -> None:
    _budget_reaching_transform(monkeypatch, summary_verb)  # never reached
    _one_clean_error(*_run(capsys, "summary", "cnn1d", "--params-of", value), *fragments)


def test_a_budget_larger_than_the_model_names_both_sizes(capsys, tmp_path, monkeypatch) -> None:
    _budget_reaching_transform(monkeypatch, summary_verb)
    reference, own = _params(create_model("cnn1d", width_mult=2)), _params(create_model("cnn1d"))
    _one_clean_error(*_run(capsys, "summary", "cnn1d", "--params-of", "cnn1d@2"),
                     f"the budget, {reference:,} parameters (dense cnn1d at width 2, 10 classes)",
                     f"exceeds the {own:,} parameters of the model being compressed (dense cnn1d, 10 classes)",
                     "nothing to compress")
    assert "--width" not in capsys.readouterr().err  # summary has no --width to suggest
    code, out, err = _run(capsys, "compress", "cnn1d", "--params-of", "cnn1d@2", "--out", str(tmp_path / "m.nesc"))
    _one_clean_error(code, out, err, "nothing to compress", "(--width with --dataset)")


def test_a_budget_larger_than_the_wide_model_is_refused_before_training(capsys, tmp_path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("the work started before the budget was refused")

    monkeypatch.setattr(compress_verb, "fit", no_training)
    reference = _params(create_model("resnet_fmnist", num_classes=SYNTHETIC_CLASSES, width_mult=0.5))
    own = _params(create_model("resnet_fmnist", num_classes=SYNTHETIC_CLASSES, width_mult=0.25))
    code, out, err = _run(capsys, "compress", "resnet_fmnist", *TRAINED, "--width", "0.25",
                          "--params-of", "resnet_fmnist@0.5", "--run-dir", str(tmp_path / "run"),
                          "--out", str(tmp_path / "m.nesc"))
    _one_clean_error(code, out, err, f"{reference:,} parameters (dense resnet_fmnist at width 0.5, 4 classes)",
                     f"{own:,} parameters of the model being compressed (dense resnet_fmnist at width 0.25, 4 classes)",
                     "or widen the model being compressed (--width)")
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.nesc").exists()


@pytest.mark.parametrize("other", [["--ratio", "2"], ["--params", "1000"]])
def test_params_of_excludes_the_other_budgets(capsys, other) -> None:
    code, _, err = _run(capsys, "summary", "cnn1d", "--params-of", "cnn1d@0.5", *other)
    assert code == USAGE_ERROR and "usage: nesc" in err
    assert f"argument {other[0]}: not allowed with argument --params-of" in err, err


# ------------------------------------------------------------------------- sampling along space / time


def test_pool_extent_and_sampling_flags_reach_the_config_and_the_training(capsys, tmp_path: Path) -> None:
    artifact = tmp_path / "m.nesc"
    code, out, err = _run(capsys, "compress", "cnn1d", "--dataset", "mnist1d", "--limit", "200", "--epochs", "1",
                          "--optimizer", "adamw", "--lr", "0.003", "--min-params", "128", "--ratio", "4",
                          "--pool-extent", "4", "--sampling-width", "2", "--starts-lr", "0.01",
                          "--run-dir", str(tmp_path / "run"), "--out", str(artifact))
    assert code == 0, err
    frozen = nesc.load(artifact)
    report = build_report(frozen)
    conv = [r for r in report.rows if r.pool and r.op.startswith("conv1d") and r.shape[-1] == 3]
    assert conv and all(r.pool_shape[-1] == 3 + 4 for r in conv), [(r.name, r.pool_shape) for r in conv]
    code, out, err = _run(capsys, "summary", "cnn1d", "--pool-extent", "-1")
    _one_clean_error(code, out, err, "pool_extent")


# ------------------------------------------------------------------------------------- reuse levels


def test_reuse_levels_reach_the_config_and_the_frozen_graph(capsys) -> None:
    shared = {}
    for level in ("inputs", "outputs"):
        code, out, err = _run(capsys, "summary", "resnet_fmnist", "--min-params", "128", "--reuse", level)
        assert code == 0 and f"reuse {level}" in out and "folded:" in out, err
        shared[level] = (out.count("shared:"), out.count("folded:"))
    # "outputs" ties every row to one input routing, so every folded layer shares its products too;
    # "inputs" rows keep their own input start and share only where few distinct ones happen to remain.
    assert shared["outputs"][0] == shared["outputs"][1] > shared["inputs"][0], shared


def test_an_unknown_reuse_level_is_a_usage_error(capsys) -> None:
    code, _, err = _run(capsys, "summary", "cnn1d", "--reuse", "everything")
    assert code == USAGE_ERROR and "argument --reuse: invalid choice: 'everything'" in err, err
