"""nesc.distributed: split_blocks / merge_blocks in process, and DDP / FSDP2 training under torchrun.

The torchrun tests start ``distributed_worker.py`` on 2 CPU processes (gloo). Their reference is a
single process that trains the same model on the same global batches, computing each rank's slice
separately and summing their gradients (``loss / world`` each) before the step; batch-norm statistics
follow rank 0's slice, as the ranks' do. That is the same math as the ranks' averaged gradients up to
summation order, so the trained states agree to ``TRAINED`` and the ranks agree bit for bit.
"""

from __future__ import annotations

import json
import operator
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import fx
from torch.nn import functional as F

import nesc
from nesc.core import names
from nesc.core.errors import ArtifactError, ConfigError, InputError, PassOrderError
from nesc.core.modules import EpitomeSampler
from nesc.distributed import fit_distributed, flat_names, merge_blocks, split_blocks
from nesc.models import get_spec
from nesc.train import epoch_order, evaluate, make_optimizer, make_scheduler, param_groups

import distributed_worker as worker
from helpers import EXACT, Tol, assert_close

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
WORLD = 2
# Six SGD steps on float32 whose gradients were summed in another order (and, with FSDP, reduce-
# scattered). Measured here: 0.0 (halving is exact and two terms add in one order); the bound leaves
# room for other world sizes' and machines' reduction orders.
TRAINED = Tol(1e-4, 1e-5)


def _transformed(name: str, **config) -> tuple[fx.GraphModule, torch.Tensor]:
    spec = get_spec(name)
    torch.manual_seed(0)
    kwargs = {"width_mult": 0.5} if name.endswith("_fmnist") else {}
    x = spec.example_inputs(4, seed=1)[0]
    return nesc.transform(spec.create(**kwargs), (x[:2],), nesc.NESConfig(**config)), x


def _pool_owners(gm: fx.GraphModule) -> dict[str, str]:
    """Each pool parameter of a split model -> the module path that holds it."""
    return {name: name.rpartition(".")[0] for name, _ in gm.named_parameters()
            if name.rpartition(".")[2].startswith(names.POOL_PREFIX)}


# ------------------------------------------------------------------------------- split / merge


@pytest.mark.parametrize("policy", ["per_layer", "per_type"])
def test_split_blocks_is_bit_identical_and_blocks_own_their_pools(policy):
    gm, x = _transformed("resnet_fmnist", ratio=2, policy=policy, min_params=1)
    split = split_blocks(gm)
    # Structure: every top-level block with compute is a GraphModule the root calls once.
    called = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert called == ["stem", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert all(isinstance(split.get_submodule(b), fx.GraphModule) for b in called)
    assert not [n for n in split.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    # Ownership: a pool read by one block lives in it (the same Parameter), one read by several in the root.
    readers: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), EpitomeSampler):
            readers.setdefault(node.args[0].target, set()).add(gm.get_submodule(node.target).weight_name.split(".")[0])
    assert readers
    for pool, blocks in readers.items():
        where = f"{next(iter(blocks))}.{pool}" if len(blocks) == 1 else pool
        assert split.get_parameter(where) is gm.get_parameter(pool), (pool, blocks)
    assert any(len(b) > 1 for b in readers.values()) == (policy == "per_type")  # the shared case is covered
    # The user's names are kept; nesc's gain the block's prefix and map back.
    assert "layer1.bn1.weight" in split.state_dict()
    assert set(flat_names(split, split.state_dict())) == set(gm.state_dict())
    # Numerics: outputs (train and eval) and gradients bit-identical to the flat model.
    for train in (True, False):
        gm.train(train), split.train(train)
        torch.manual_seed(0)
        want = gm(x)
        torch.manual_seed(0)
        assert_close(split(x), want, EXACT, f"split output (train={train})")
    gm.train(), split.train()
    gm(x).square().sum().backward()
    flat_grads = {k: p.grad.clone() for k, p in gm.named_parameters()}
    gm.zero_grad()
    split(x).square().sum().backward()
    for key, grad in flat_names(split, {k: p.grad for k, p in split.named_parameters()}).items():
        assert_close(grad, flat_grads[key], EXACT, f"gradient of {key}")


def test_shared_pool_sits_with_the_nearest_common_parent_at_depth_2():
    gm, x = _transformed("mobilenetv2_fmnist", ratio=2, policy="per_type", min_params=1)
    split = split_blocks(gm, depth=2)
    called = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert called[0] == "features.0" and "classifier.1" in called
    owners = _pool_owners(split)
    # per_type pools are read by many features.N blocks (their common parent: the container
    # ``features``, which never runs itself) or by features and the classifier (the root).
    assert set(owners.values()) & {"features", ""}
    split.eval(), gm.eval()
    assert_close(split(x), gm(x), EXACT, "depth-2 split output")


class _Reused(torch.nn.Module):
    """``act`` runs between the two blocks and after them: two stretches, so it cannot be one block."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_a_module_run_in_several_stretches_stays_in_the_root():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    gm = nesc.transform(_Reused(), (x,), nesc.NESConfig(ratio=2, min_params=1, keep_first=False,
                                                       keep_classifier=False))
    split = split_blocks(gm)
    called = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert called == ["fc1", "act", "fc2", "act"]
    assert isinstance(split.fc1, fx.GraphModule) and not isinstance(split.act, fx.GraphModule)
    assert_close(split(x), gm(x), EXACT, "split output")


def test_merge_blocks_gives_back_the_flat_model_that_freeze_reads():
    gm, x = _transformed("resnet_fmnist", ratio=2, policy="per_type", min_params=1)
    merged = merge_blocks(split_blocks(gm))
    assert set(merged.state_dict()) == set(gm.state_dict())
    assert set(dict(merged.named_modules())) == set(dict(gm.named_modules()))
    assert names.BLOCKS not in merged.meta and merged.meta[names.PLAN] is gm.meta[names.PLAN]
    gm.eval(), merged.eval()
    assert_close(merged(x), gm(x), EXACT, "merged output")
    assert_close(nesc.freeze(merged)(x), nesc.freeze(gm)(x), EXACT, "frozen merged output")
    for model in (merged, split_blocks(gm)):  # nesc's own refusal to be pickled, pointing to nesc.save
        with pytest.raises(ArtifactError, match="nesc.save"):
            pickle.dumps(model)


def test_split_blocks_refuses_bad_requests():
    gm, _ = _transformed("mlp", ratio=4)
    with pytest.raises(ConfigError, match="depth"):
        split_blocks(gm, depth=0)
    with pytest.raises(PassOrderError, match="split already"):
        split_blocks(split_blocks(gm))
    with pytest.raises(PassOrderError, match="split_blocks"):
        merge_blocks(gm)


def test_fit_distributed_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gm, ds = worker.setup("mlp")
    with pytest.raises(InputError, match="torchrun"):
        fit_distributed(gm, ds, worker.CONFIG)


# ----------------------------------------------------------------------------------- torchrun


def _torchrun(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           str(WORKER), "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _ranks(out: Path, tag: str = "") -> tuple[list[dict], list[dict]]:
    states = [load_file(str(out / f"{tag}rank{r}.safetensors")) for r in range(WORLD)]
    docs = [json.loads((out / f"{tag}rank{r}.json").read_text()) for r in range(WORLD)]
    return states, docs


def _assert_ranks_identical(states: list[dict], docs: list[dict]) -> None:
    assert all(d["differ"] == [] for d in docs), [d["differ"][:5] for d in docs]
    for key in states[0]:
        assert_close(states[1][key], states[0][key], EXACT, f"rank 1 vs rank 0: {key}")
    assert _strip(docs[1]["history"]) == _strip(docs[0]["history"])


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # seconds are per rank


def _reference(model: str) -> tuple[dict, list[tuple[float, float]]]:
    """Single process, each global batch's two rank slices summed (see the module docstring)."""
    gm, ds = worker.setup(model)
    config = worker.CONFIG
    steps = len(ds) // config.batch_size
    optimizer = make_optimizer(param_groups(gm, config), config)
    scheduler = make_scheduler(optimizer, config, steps)
    losses = []
    for epoch in range(config.epochs):
        gm.train()
        order, total = epoch_order(len(ds), config.seed, epoch), 0.0
        for step in range(steps):
            optimizer.zero_grad()
            rank0_buffers = None
            for rank, idx in enumerate(order[step * config.batch_size:(step + 1) * config.batch_size].tensor_split(WORLD)):
                loss = F.cross_entropy(gm(ds.x_train[idx]), ds.y_train[idx])
                (loss / WORLD).backward()
                total += loss.item() * len(idx)
                if rank == 0:
                    rank0_buffers = {k: b.clone() for k, b in gm.named_buffers()}
            with torch.no_grad():
                for k, b in gm.named_buffers():
                    b.copy_(rank0_buffers[k])
            optimizer.step()
            scheduler.step()
        losses.append((total / (steps * config.batch_size), evaluate(gm, ds)[0]))
    return gm.state_dict(), losses


def _assert_matches_reference(states: list[dict], docs: list[dict], model: str) -> None:
    want, losses = _reference(model)
    assert set(states[0]) == set(want)
    for key, value in want.items():
        assert_close(states[0][key].to(value.dtype), value, TRAINED, f"trained {key} vs the reference")
    for row, (train_loss, test_loss) in zip(docs[0]["history"], losses, strict=True):  # eval after a step
        for got, want in ((row["train_loss"], train_loss), (row["test_loss"], test_loss)):
            assert abs(got - want) <= TRAINED.atol + TRAINED.rtol * abs(want), (row, train_loss, test_loss)


def test_fsdp_per_block_trains_like_one_process(tmp_path):
    """The CI one: FSDP2 on every block of resnet_fmnist, then the root; pools shared across blocks."""
    out = _torchrun(tmp_path, "--mode", "fsdp", "--model", "resnet_fmnist")
    states, docs = _ranks(out)
    _assert_ranks_identical(states, docs)
    _assert_matches_reference(states, docs, "resnet_fmnist")


@pytest.mark.slow
@pytest.mark.parametrize("mode, model", [("ddp", "resnet_fmnist"), ("ddp", "mlp"), ("fsdp", "mlp")])
def test_training_matches_one_process(tmp_path, mode, model):
    out = _torchrun(tmp_path, "--mode", mode, "--model", model)
    states, docs = _ranks(out)
    _assert_ranks_identical(states, docs)
    _assert_matches_reference(states, docs, model)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoint_resumes_exactly(tmp_path, mode):
    """Stopped after epoch 1 and resumed in fresh models: the next epoch's loss and the final state
    are bit-identical to an uninterrupted run's."""
    out = _torchrun(tmp_path, "--mode", mode, "--model", "resnet_fmnist", "--task", "resume")
    full, full_docs = _ranks(out, "full-")
    cut, cut_docs = _ranks(out, "cut-")
    _assert_ranks_identical(cut, cut_docs)
    assert _strip(cut_docs[0]["history"]) == _strip(full_docs[0]["history"])
    for key in full[0]:
        assert_close(cut[0][key], full[0][key], EXACT, f"resumed {key}")
    assert sorted(p.name for p in (out / "cut-run").iterdir() if p.suffix == ".json" and "checkpoint" in p.name) \
        == ["checkpoint-1.json", "checkpoint-2.json"]


# ------------------------------------------------------------------------------- command line

CLI_MODEL = ["resnet_fmnist", "--dataset", "synthetic", "--width", "0.25", "--batch-size", "16", "--epochs", "1"]


def test_cli_distributed_outside_torchrun_says_how_to_launch(capsys, monkeypatch, tmp_path):
    from nesc.cli import USAGE_ERROR, main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", *CLI_MODEL, "--distributed", "fsdp", "--run-dir", str(tmp_path / "run")])
    assert code == USAGE_ERROR
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_distributed_writes_the_weights_once(tmp_path):
    from nesc.data import load_dataset
    from nesc.train import evaluate

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "nesc.cli", "train", *CLI_MODEL, "--distributed", "fsdp", "--run-dir", str(run)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("weights:") == 1  # rank 0 alone prints
    rows = json.loads((run / "metrics.json").read_text())
    model = get_spec("resnet_fmnist").create(num_classes=4, width_mult=0.25)
    nesc.load_checkpoint(model, run / "model.safetensors")
    _, acc = evaluate(model, load_dataset("synthetic"))
    assert acc == pytest.approx(rows[-1]["test_acc"])
