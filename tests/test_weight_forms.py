"""Every form of weight nesc samples besides plain conv/linear layers, end to end: tied embeddings,
attention modules (packed and sliced projections), weights computed from parameters (weight
standardisation, weight norm), string padding, transposed and 3-D convs, einsum against a parameter.

Each tiny model: transform at ratio 2 (everything compressible compressed) -> the weights that used
to stay dense are sampled -> five Adam steps lower the loss -> freeze: the frozen model equals the
trained one in eval mode -> save/load gives it back. Before training, the transformed model equals the
eager model holding the sampled weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nesc
from helpers import CLOSE, COMPRESS_ALL, assert_close, sampled_weights, sampler_nodes


class TiedLM(nn.Module):
    """Embedding + lm_head sharing one parameter (GPT-2, T5, Llama with tie_word_embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 24)
        self.mix = nn.Linear(24, 24)
        self.head = nn.Linear(24, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        h = self.layer(x)
        return self.cross(h, x, x)[0]


class StdConv(nn.Module):
    """Weight standardisation (BiT): batch norm over each output filter of the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 32, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), padding=1)


def _weight_norm_conv1d() -> nn.Module:
    """wav2vec2's positional conv: weight norm over the kernel axis, grouped, 'same'-sized output."""
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 32, 3, padding=1), dim=2), nn.GELU())


class SamePadding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(8, 32, 3, padding="same")
        self.c1 = nn.Conv1d(8, 32, 5, padding="same")

    def forward(self, x, s):
        return self.c2(x).mean((2, 3)) + self.c1(s).mean(-1)


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(16, 32, 3, stride=2)
        self.vol = nn.Conv3d(8, 32, 3, padding=1)

    def forward(self, x, v):
        return self.up(x).mean((2, 3)) + self.vol(v).mean((2, 3, 4))


class Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 32) * 0.2)

    def forward(self, x):
        return torch.einsum("bsi,io->bso", x, self.w)


# name -> (model, inputs, weights that must be sampled)
CASES = {
    "tied_embedding": (TiedLM, lambda: (torch.randint(0, 64, (2, 6)),), {"embed.weight", "mix.weight"}),
    "transformer_encoder": (Encoder, lambda: (torch.randn(2, 5, 32),),
                            {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "layer.linear1.weight",
                             "layer.linear2.weight", "cross.in_proj_weight", "cross.out_proj.weight"}),
    "weight_standardised_conv": (StdConv, lambda: (torch.randn(2, 16, 6, 6),), {"weight"}),
    "weight_norm_conv1d": (_weight_norm_conv1d, lambda: (torch.randn(2, 16, 12),),
                           {"0.parametrizations.weight.original1"}),
    "same_padding_conv2d_conv1d": (SamePadding, lambda: (torch.randn(2, 8, 6, 6), torch.randn(2, 8, 12)),
                                   {"c2.weight", "c1.weight"}),
    "conv_transpose2d_conv3d": (Upsampler, lambda: (torch.randn(2, 16, 4, 4), torch.randn(2, 8, 3, 3, 3)),
                                {"up.weight", "vol.weight"}),
    "einsum": (Einsum, lambda: (torch.randn(2, 5, 24),), {"w"}),
}


def _with_weights(model: nn.Module, weights: dict) -> nn.Module:
    """A copy of ``model`` holding ``weights`` (a merged 4-D view reshaped back to the parameter)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name in weights:
                p.copy_(weights[name].reshape(p.shape))
    return twin


@pytest.mark.parametrize("case", list(CASES))
def test_transform_train_freeze_save_load(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    build, make_inputs, must_sample = CASES[case]
    model, x = build().eval(), make_inputs()
    gm = nesc.transform(model, x, ratio=2, init="random", **COMPRESS_ALL)
    report = nesc.summary(gm, print_table=False)
    sampled = {r.name for r in report.rows if r.state == "sampled"}
    assert must_sample <= sampled, (must_sample - sampled, [(r.name, r.state, r.reason) for r in report.rows])
    # One sampler per parameter, however many ops read it (tied heads, sliced projections).
    assert len(sampler_nodes(gm)) == len({s.weight_name for _, s in sampler_nodes(gm)}) == len(sampled)
    # The eager model holding the sampled weights: the computation after them (slices, weight norm,
    # standardisation) and every consumer (the tied head) behave as in the user's model.
    assert_close(gm.eval()(*x), _with_weights(model, sampled_weights(gm))(*x), CLOSE, f"{case}: vs eager")

    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    target = torch.randn_like(gm(*x))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(gm(*x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    gm.eval()
    frozen = nesc.freeze(gm)
    assert_close(frozen(*x), gm(*x), CLOSE, f"{case}: frozen vs trained in eval mode")
    nesc.save(frozen, tmp_path / "m.nesc")
    loaded = nesc.load(tmp_path / "m.nesc")
    assert_close(loaded(*x), frozen(*x), CLOSE, f"{case}: loaded vs frozen")
