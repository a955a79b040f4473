"""passes.fold_batchnorm (rewrite) and nesc.freeze(fold_batchnorm=True): eval-mode batch norms become a
per-channel scale and shift; outputs equal the unfolded frozen model's (eager batch norm) within float
rounding, fewer tensors are stored, and the artifact round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nesc
from helpers import (
    CLOSE,
    COMPRESS_ALL,
    EXACT,
    ShapeBranchNet,
    StageNet,
    assert_backend_close,
    assert_close,
    call_modules_of,
    check_pass,
    run,
    stage_net_inputs,
)
from nesc.capture import ExportedBatchNorm
from nesc.core import names
from nesc.core.errors import NescWarning, PassOrderError
from nesc.passes.fold_batchnorm import fold_batchnorm

aten = torch.ops.aten


def _with_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from their initial 0/1, so a wrong fold shows."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


def _frozen(model_cls=StageNet, **freeze):
    model = _with_statistics(model_cls())
    gm = nesc.transform(model, stage_net_inputs(), ratio=2, init="random", **COMPRESS_ALL)
    return model, nesc.freeze(gm), nesc.freeze(gm, **freeze) if freeze else None


def _batch_norms(gm) -> list:
    return call_modules_of(gm, nn.BatchNorm2d) + call_modules_of(gm, ExportedBatchNorm)


@pytest.mark.parametrize("model_cls", [StageNet, ShapeBranchNet], ids=["symbolic_trace", "export"])
def test_batch_norms_become_scale_and_shift_with_parity(model_cls) -> None:
    _, frozen, folded = _frozen(model_cls, fold_batchnorm=True)
    assert frozen.meta[names.CAPTURE] == ("symbolic_trace" if model_cls is StageNet else "export")
    assert _batch_norms(frozen) and not _batch_norms(folded)
    targets = [n.target for n in folded.graph.nodes if n.op == "get_attr"]
    assert any(t.endswith(names.FOLDED_SCALE) for t in targets) and any(t.endswith(names.FOLDED_SHIFT) for t in targets)
    for seed in range(3):
        x = stage_net_inputs(seed=seed)
        assert_close(run(folded, x), run(frozen, x), CLOSE, f"folded vs eager batch norm, seed {seed}")
    # Two per-channel tensors instead of weight, bias, running mean, running var and the batch counter.
    stored = {k for k in frozen.state_dict()} - {k for k in folded.state_dict()}
    assert any(k.endswith("running_var") for k in stored) and not any(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in folded.state_dict())
    report, report_folded = (nesc.summary(m, print_table=False) for m in (frozen, folded))
    assert report_folded.stored_params == report.stored_params
    assert any("batch norm (folded" in reason for reason in report_folded.other_dense)


def test_the_fold_is_the_eval_formula() -> None:
    """Against the closed form, computed here in float64: scale = w / sqrt(var + eps), shift = b - mean * scale."""
    model, _, folded = _frozen(fold_batchnorm=True)
    bn = model.bn
    scale = folded.get_parameter(f"bn.{names.FOLDED_SCALE}")
    shift = folded.get_parameter(f"bn.{names.FOLDED_SHIFT}")
    want = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    assert_close(scale.flatten().double(), want, CLOSE, "scale")
    assert_close(shift.flatten().double(), bn.bias.double() - bn.running_mean.double() * want, CLOSE, "shift")
    assert scale.shape == (bn.num_features, 1, 1) and scale.requires_grad


def test_pass_result_second_run_and_other_modules_untouched() -> None:
    class WithLayerNorm(StageNet):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(super().forward(x).repeat(1, 2)[:, :8])

    _, frozen, _ = _frozen(WithLayerNorm)
    norm = dict(frozen.named_parameters())["norm.weight"].clone()
    gm = check_pass(fold_batchnorm(frozen), modified=True)
    assert torch.equal(gm.get_parameter("norm.weight"), norm)  # a module called as a module keeps its tensors
    check_pass(fold_batchnorm(gm), modified=False)


def test_refuses_training_mode_and_leaves_batch_statistics_alone() -> None:
    _, frozen, _ = _frozen()
    with pytest.raises(PassOrderError, match="eval mode"):
        fold_batchnorm(frozen.train())

    class BatchStats(StageNet):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(self.bn.num_features, track_running_stats=False)

    _, frozen, _ = _frozen(BatchStats)
    x = stage_net_inputs(seed=1)
    want = run(frozen, x)
    with pytest.warns(NescWarning, match="without running statistics"):
        gm = check_pass(fold_batchnorm(frozen), modified=False)
    assert_close(run(gm, x), want, EXACT)


def test_folded_artifact_round_trips_and_is_smaller(tmp_path) -> None:
    _, frozen, folded = _frozen(fold_batchnorm=True)
    nesc.save(frozen, tmp_path / "plain.nesc")
    nesc.save(folded, tmp_path / "folded.nesc")
    assert (tmp_path / "folded.nesc").stat().st_size < (tmp_path / "plain.nesc").stat().st_size
    loaded = nesc.load(tmp_path / "folded.nesc")
    x = stage_net_inputs(seed=2)
    assert_close(run(loaded, x), run(folded, x), EXACT, "loaded vs folded")
    assert aten.mul.Tensor in {n.target for n in loaded.graph.nodes}
    loss = F.cross_entropy(loaded.train()(*x), torch.arange(4))
    loss.backward()  # the folded affine fine-tunes like any parameter
    assert loaded.get_parameter(f"bn.{names.FOLDED_SCALE}").grad is not None


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_folded_model_lowers_with_parity(backend, tmp_path) -> None:
    """The folded affine is plain aten mul/add: both backends lower it, against eager PyTorch."""
    _, _, folded = _frozen(fold_batchnorm=True)
    x = stage_net_inputs(seed=3)
    want = run(folded, x)
    if backend == "onnx":
        ort = pytest.importorskip("onnxruntime")
        nesc.export_onnx(folded, x, tmp_path / "m.onnx")
        session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})[0]
    else:
        pytest.importorskip("tvm")
        got = nesc.compile(folded, x)(x[0].numpy())
    assert_backend_close(got, want, f"{backend} vs eager")
