"""The training loop on the synthetic set: it learns, resumes exactly, logs, distils, and reports."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from helpers import EXACT, assert_close
from torch import nn

import nesc
from nesc.core.errors import ConfigError, InputError
from nesc.core.modules import EpitomeSampler
from nesc.data import load_dataset
from nesc.train import TrainConfig, epoch_order, evaluate, fit, param_groups, sampling_width_at

FAST = TrainConfig(epochs=3, batch_size=64, lr=0.01, optimizer="adamw", weight_decay=1e-4, progress=False)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def compressed(data, seed: int = 0):
    return nesc.transform(small_net(seed), (data.x_train[:2],), ratio=2, min_params=128)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(("change", "match"), [
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"batch_size": 2.0}, "batch_size must be an int"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"optimizer": "lion"}, "optimizer='lion' is not one of sgd, adamw"),
    ({"schedule": "poly"}, "schedule='poly' is not one of cosine, step, constant"),
    ({"distill_alpha": 1.5}, "distill_alpha must be in"),
    ({"limit": 0}, "limit must be a positive number"),
    ({"bn_recalibration": -1}, "bn_recalibration must be an int >= 0"),
])
def test_config_is_validated(change, match) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**change)


def test_cuda_request_without_cuda_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        TrainConfig(device="cuda")


# ---------------------------------------------------------------------------------------- learning


def test_dense_model_learns(data) -> None:
    result = fit(small_net(), data, FAST)
    losses = [h["train_loss"] for h in result.history]
    assert losses[0] > losses[1] > losses[2]
    assert result.test_acc > 0.7  # 4 classes: chance is 0.25
    assert result.stored_params == sum(p.numel() for p in small_net().parameters())
    assert result.madd is not None and result.madd > 0


def test_a_diverging_run_stops_with_an_input_error(data) -> None:
    bad = dataclasses.replace(data, x_train=torch.full_like(data.x_train, float("inf")))
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"training diverged in epoch 1: loss is nan; lower --lr"):
        fit(model, bad, FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k)  # no step was taken on the non-finite loss


def test_nesc_model_learns_pools_and_starts(data) -> None:
    gm = compressed(data)
    starts_before = {n: s.starts.detach().clone() for n, s in gm.named_modules() if isinstance(s, EpitomeSampler)}
    assert starts_before
    result = fit(gm, data, FAST)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.test_acc > 0.6
    for name, before in starts_before.items():
        assert not torch.equal(gm.get_submodule(name).starts, before), f"{name}: start indices did not train"
    assert result.stored_params == nesc.stored_params(gm)


def test_pool_learning_rate_is_rescaled_by_the_sampler_scale(data) -> None:
    gm = compressed(data)
    groups = param_groups(gm, FAST)
    samplers = [m for m in gm.modules() if isinstance(m, EpitomeSampler)]
    pools = {id(gm.get_parameter(n)) for n, _ in gm.named_parameters() if n.startswith("nesc_pool")}
    assert groups[0]["lr"] == FAST.lr and not any(id(p) in pools for p in groups[0]["params"])
    # per_layer: one sampler per pool, so each pool's rate is lr / its sampler's scale (Adam), / scale^2 (SGD).
    assert sorted(g["lr"] for g in groups[1:-1]) == pytest.approx(sorted(FAST.lr / float(s.scale) for s in samplers))
    sgd = param_groups(gm, FAST.replace(optimizer="sgd"))
    assert sorted(g["lr"] for g in sgd[1:-1]) == pytest.approx(sorted(FAST.lr / float(s.scale) ** 2 for s in samplers))


def test_start_indices_have_their_own_group_without_weight_decay(data) -> None:
    gm = compressed(data)
    samplers = [m for m in gm.modules() if isinstance(m, EpitomeSampler)]
    groups = param_groups(gm, FAST.replace(starts_lr=0.02, weight_decay=0.1))
    starts = groups[-1]
    assert {id(p) for p in starts["params"]} == {id(s.starts) for s in samplers}
    assert starts["lr"] == 0.02 and starts["weight_decay"] == 0.0
    others = [id(p) for g in groups[:-1] for p in g["params"]]
    assert len(others) == len(set(others)) and not set(others) & {id(s.starts) for s in samplers}
    # Every trainable parameter is in exactly one group.
    assert sorted(others + [id(p) for p in starts["params"]]) == sorted(id(p) for p in gm.parameters())
    # AdamW with this group leaves a start with zero gradient where it is (no decay towards cell 0).
    s = samplers[0]
    s.starts.data += 0.3
    before = s.starts.detach().clone()
    opt = torch.optim.AdamW(groups, lr=FAST.lr, weight_decay=0.1)
    for p in gm.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(s.starts.detach(), before)


def test_fit_anneals_the_sampling_width_and_reports_start_moves(data) -> None:
    gm = compressed(data)
    config = FAST.replace(epochs=2, sampling_width=3.0, width_anneal=0.5, starts_lr=0.05)
    steps = -(-len(data.y_train) // config.batch_size) * config.epochs
    widths = [sampling_width_at(t, steps, config) for t in range(steps)]
    assert widths[0] == 3.0 and widths[-1] == 1.0 and all(a >= b for a, b in zip(widths, widths[1:]))
    assert sampling_width_at(steps // 2, steps, config) == 1.0
    result = fit(gm, data, config)
    assert all(m.width == 1.0 for m in gm.modules() if isinstance(m, EpitomeSampler))
    row = result.history[-1]
    assert row["start_max_move"] >= row["start_mean_move"] > 0
    assert 0 < row["start_moved"] <= 1


def test_gm_modes_switch_batch_norm_and_dropout(data) -> None:
    gm = compressed(data)
    fit(gm, data, FAST.replace(epochs=1))
    x = data.x_test[:16]
    gm.eval()
    assert_close(gm(x), gm(x), EXACT, "eval mode is deterministic")
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    assert not torch.equal(a, gm(x))  # dropout is active in train mode


# ------------------------------------------------------------------------------------- resume, logs


def test_resume_after_an_interruption_ends_bit_identical(data, tmp_path) -> None:
    """Interrupted after epoch 1 and resumed, a nesc model (pools, learned starts, BN statistics,
    dropout) ends with exactly the weights of an uninterrupted run."""
    config = FAST.replace(epochs=3, optimizer="sgd", lr=0.02, schedule="cosine")
    whole = compressed(data)
    fit(whole, data, config, out_dir=tmp_path / "whole")
    first = compressed(data)
    partial = fit(first, data, config, out_dir=tmp_path / "cut", stop_after=1)
    assert partial.epochs == 1
    torch.manual_seed(12345)  # a resumed process starts with some other global RNG state
    resumed = compressed(data)
    result = fit(resumed, data, config, out_dir=tmp_path / "cut")
    assert result.epochs == 3
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(".starts" in k for k in a)
    for key in a:
        assert_close(b[key], a[key], EXACT, key)
    logged = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    full = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert [r["train_loss"] for r in logged] == [r["train_loss"] for r in full]


def test_a_finished_run_resumes_to_nothing_and_no_resume_starts_over(data, tmp_path) -> None:
    model = small_net()
    fit(model, data, FAST.replace(epochs=1), out_dir=tmp_path)
    again = small_net()
    result = fit(again, data, FAST.replace(epochs=1), out_dir=tmp_path)  # loads the final weights
    for key, value in model.state_dict().items():
        assert_close(again.state_dict()[key], value, EXACT, key)
    assert result.epochs == 1


def test_resume_with_other_settings_is_refused(data, tmp_path) -> None:
    fit(small_net(), data, FAST.replace(epochs=1), out_dir=tmp_path)
    with pytest.raises(InputError, match="other settings.*'lr': \\(0.01, 0.02\\)"):
        fit(small_net(), data, FAST.replace(epochs=2, lr=0.02), out_dir=tmp_path)


def test_logs_and_checkpoint_files(data, tmp_path) -> None:
    fit(small_net(), data, FAST.replace(epochs=2), out_dir=tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in rows]
    doc = json.loads((tmp_path / "checkpoint-2.json").read_text())
    assert doc["epoch"] == 2 and doc["config"]["lr"] == FAST.lr and doc["tensors"] == "checkpoint-2.safetensors"
    # The newest verified checkpoint and the one before it are kept, each a document and its tensors.
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == [
        "checkpoint-1.json", "checkpoint-1.safetensors", "checkpoint-2.json", "checkpoint-2.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    # The cosine schedule runs to 0 over the whole run.
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_decays_every_step_epochs(data) -> None:
    result = fit(small_net(), data, FAST.replace(epochs=2, schedule="step", step_epochs=1, gamma=0.5))
    assert [h["lr"] for h in result.history] == pytest.approx([FAST.lr * 0.5, FAST.lr * 0.25])


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(50, 0, 3), epoch_order(50, 0, 3))
    assert not torch.equal(epoch_order(50, 0, 3), epoch_order(50, 0, 4))
    assert sorted(epoch_order(50, 1, 0).tolist()) == list(range(50))


# ------------------------------------------------------------------------------------ distillation


def test_distillation_uses_the_teacher(data) -> None:
    teacher = small_net(1)
    fit(teacher, data, FAST.replace(epochs=2))
    frozen_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = fit(compressed(data), data, FAST.replace(epochs=1))
    distilled = fit(compressed(data), data, FAST.replace(epochs=1, distill_alpha=1.0), teacher=teacher)
    assert distilled.history[0]["train_loss"] != plain.history[0]["train_loss"]
    for k, v in teacher.state_dict().items():
        assert_close(v, frozen_teacher[k], EXACT, f"teacher {k} must not change")
    assert not teacher.training


def test_bn_recalibration_recomputes_statistics(data) -> None:
    model = small_net()
    fit(model, data, FAST.replace(epochs=1, bn_recalibration=2))
    bn = model[1]
    # Exact averages over the first 2 train batches of the (unlimited) train split, as update_bn computes.
    model.eval()
    with torch.no_grad():
        feats = model[0](data.x_train[:128])
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_evaluate_restores_the_mode(data) -> None:
    model = small_net().train()
    loss, acc = evaluate(model, data)
    assert model.training and 0 <= acc <= 1 and loss > 0


def test_nothing_to_train_is_an_error(data) -> None:
    model = small_net()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(InputError, match="no trainable parameters"):
        fit(model, data, FAST)


def test_progress_bars_go_to_stderr(data, capsys) -> None:
    fit(small_net(), data, FAST.replace(epochs=1, progress=True))
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1" in err
