"""nesc.core.nopickle: a nesc GraphModule refuses pickling with an error naming nesc.save and
state_dict; copies still work; the state_dict route it points to resumes training exactly."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

import nesc
from helpers import COMPRESS_ALL, StageNet, stage_net_inputs
from nesc.core.errors import ArtifactError


def _transformed(seed: int = 0):
    torch.manual_seed(seed)
    return nesc.transform(StageNet(), stage_net_inputs(), init="random", ratio=2, **COMPRESS_ALL)


def _step(gm, opt, seed: int) -> None:
    gm.train()
    opt.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(gm(*stage_net_inputs(seed=seed)), torch.arange(4)).backward()
    opt.step()


@pytest.mark.parametrize("form", ["trainable", "frozen", "loaded"])
def test_pickling_a_nesc_graph_names_nesc_save(form, tmp_path) -> None:
    gm = _transformed()
    if form != "trainable":
        gm = nesc.freeze(gm)
    if form == "loaded":
        nesc.save(gm, tmp_path / "m.nesc")
        gm = nesc.load(tmp_path / "m.nesc")
    for dump in (lambda: torch.save(gm, io.BytesIO()), lambda: pickle.dumps(gm)):
        with pytest.raises(ArtifactError, match=r"nesc\.save.*state_dict"):
            dump()
    x = stage_net_inputs(seed=3)
    assert torch.equal(copy.deepcopy(gm).eval()(*x), gm.eval()(*x))  # copies are not pickles


def test_only_nesc_graphs_are_affected() -> None:
    _transformed()
    other = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert isinstance(pickle.loads(pickle.dumps(other)), torch.fx.GraphModule)


def test_the_state_dict_route_resumes_training_with_the_same_outputs_and_gradients(tmp_path) -> None:
    """Train 2 steps, save the state_dict, load it into a transform of a differently initialised
    model, train 2 more steps on both: same outputs and gradients bit for bit."""
    a = _transformed(seed=0)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.3)
    for step in range(2):
        _step(a, opt_a, step)
    save_model(a, str(tmp_path / "state.safetensors"))
    b = _transformed(seed=1)
    load_model(b, str(tmp_path / "state.safetensors"))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.3)
    for step in range(2, 4):
        _step(a, opt_a, step)
        _step(b, opt_b, step)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad), name
    x = stage_net_inputs(seed=9)
    assert torch.equal(a.eval()(*x), b.eval()(*x))
