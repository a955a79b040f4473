"""nesc.fitting: dense checkpoints load from local .pt and .safetensors files with clear errors, NaN or
inf dense weights are fitted with a warning naming the layers, and the distillation loss is Hinton et
al.'s KL + CE, checked against a hand-written formula."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nesc
from helpers import CLOSE, COMPRESS_ALL, EXACT, F64, StageNet, assert_close, stage_net_inputs
from nesc.core.errors import NescWarning


def _trained_like() -> StageNet:
    torch.manual_seed(1)
    model = StageNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_()  # buffers travel with the checkpoint too
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_close(sa[k], sb[k], EXACT, k)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_pt_checkpoint(tmp_path, wrap) -> None:
    source = _trained_like()
    state = source.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, tmp_path / "dense.pt")
    torch.manual_seed(2)
    target = StageNet()
    returned = nesc.load_checkpoint(target, tmp_path / "dense.pt")
    assert returned is target
    _assert_same_state(target, source)


def test_load_safetensors_checkpoint(tmp_path) -> None:
    source = _trained_like()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    target = nesc.load_checkpoint(StageNet(), str(tmp_path / "dense.safetensors"))
    _assert_same_state(target, source)


def test_checkpoint_then_transform_fits_the_loaded_weights(tmp_path) -> None:
    source = _trained_like()
    torch.save(source.state_dict(), tmp_path / "dense.pt")
    model = nesc.load_checkpoint(StageNet(), tmp_path / "dense.pt")
    a = nesc.transform(model, (torch.randn(2, 3, 8, 8),), ratio=2, min_params=0)
    b = nesc.transform(source, (torch.randn(2, 3, 8, 8),), ratio=2, min_params=0)
    assert a.meta["nesc_fit_errors"] == b.meta["nesc_fit_errors"]  # same weights, same deterministic fit


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mismatched_checkpoint_is_an_input_error(tmp_path, suffix) -> None:
    other = nn.Sequential(nn.Linear(4, 4))
    path = tmp_path / f"other{suffix}"
    if suffix == ".pt":
        torch.save(other.state_dict(), path)
    else:
        save_file(other.state_dict(), str(path))
    with pytest.raises(nesc.InputError) as info:
        nesc.load_checkpoint(StageNet(), path)
    msg = str(info.value)
    assert str(path) in msg and "StageNet" in msg and "same architecture" in msg


def test_wrong_shape_checkpoint_is_an_input_error(tmp_path) -> None:
    torch.save(StageNet(width=16).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(nesc.InputError, match="size mismatch"):
        nesc.load_checkpoint(StageNet(width=32), tmp_path / "narrow.pt")


def test_missing_checkpoint_is_an_input_error(tmp_path) -> None:
    with pytest.raises(nesc.InputError, match="does not exist"):
        nesc.load_checkpoint(StageNet(), tmp_path / "nope.pt")


def test_pickled_objects_are_refused(tmp_path) -> None:
    torch.save({"state_dict": StageNet().state_dict(), "evil": object()}, tmp_path / "pickled.pt")
    with pytest.raises(nesc.InputError) as info:
        nesc.load_checkpoint(StageNet(), tmp_path / "pickled.pt")
    message = str(info.value)
    assert "pickled.pt" in message and "arbitrary Python objects" in message and "state_dict()" in message


def test_non_strict_load_fills_what_matches(tmp_path) -> None:
    source = _trained_like()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save(state, tmp_path / "partial.pt")
    target = nesc.load_checkpoint(StageNet(), tmp_path / "partial.pt", strict=False)
    assert_close(target.stem.weight, source.stem.weight, EXACT, "stem")


# ------------------------------------------------------------------------ non-finite dense weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_dense_weights_warn_and_name_the_layers(bad: float) -> None:
    torch.manual_seed(0)
    model = StageNet()
    with torch.no_grad():
        model.conv3.weight[0, 0, 0, :2] = bad
        model.mix.weight[1, 1] = bad
    with pytest.warns(NescWarning) as record:
        gm = nesc.transform(model, stage_net_inputs(), ratio=2, **COMPRESS_ALL)
    (warning,) = [w for w in record if issubclass(w.category, NescWarning)]
    msg = str(warning.message)
    assert "2 layer(s)" in msg and "NaN or inf" in msg  # what
    assert "conv3.weight (2 of 18,432 values" in msg and "mix.weight (1 of 4,096 values" in msg  # where
    assert "stem.weight" not in msg and "Check the checkpoint" in msg  # only the bad ones; how to fix
    assert warning.filename == __file__, "the warning points at the caller's line"
    # Legal: the plan and the fit still run, and the report of errors shows what it did.
    assert set(gm.meta["nesc_fit_errors"]) >= {"conv3.weight", "stem.weight"}


def test_finite_dense_weights_do_not_warn() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NescWarning)
        nesc.transform(StageNet(), stage_net_inputs(), ratio=2, **COMPRESS_ALL)


# ------------------------------------------------------------------------------- distillation


def _hand_kd(student, teacher, targets, T, alpha):
    """KL(p_teacher || p_student) at temperature T, scaled by T^2, averaged over the batch, mixed with CE."""
    p_t = torch.softmax(teacher / T, dim=-1)
    log_p_s = torch.log_softmax(student / T, dim=-1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean() * T * T
    if targets is None:
        return kl
    ce = -torch.log_softmax(student, dim=-1).gather(1, targets[:, None]).mean()
    return alpha * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T, alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 0.0)])
def test_distillation_loss_equals_kl_plus_ce(T: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(6, 10, generator=g, dtype=torch.float64),
        torch.randn(6, 10, generator=g, dtype=torch.float64),
    )
    targets = torch.randint(0, 10, (6,), generator=g)
    got = nesc.distillation_loss(student, teacher, targets, temperature=T, alpha=alpha)
    assert_close(got, _hand_kd(student, teacher, targets, T, alpha), CLOSE, "KD + CE")


def test_distillation_loss_without_targets_is_the_kd_term() -> None:
    student, teacher = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    got = nesc.distillation_loss(student, teacher)
    assert_close(got, _hand_kd(student, teacher, None, 4.0, 0.9), CLOSE, "pure KD")
    assert_close(nesc.distillation_loss(teacher, teacher), torch.zeros((), dtype=torch.float64), F64, "KD(t, t)")


def test_distillation_does_not_train_the_teacher() -> None:
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    nesc.distillation_loss(student, teacher, torch.tensor([0, 1, 2, 3])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
