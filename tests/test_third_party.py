"""Models nobody here wrote: Hugging Face transformers built from small configs (nothing downloads).

They defeat torch.fx.symbolic_trace, so they exercise the export capture path end to end: capture,
find every projection (nn.Linear in BERT, GPT-2's Conv1D as addmm against an (I, O) parameter), train,
freeze with parity.
"""

from __future__ import annotations

import pytest
import torch

import nesc

transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=32, num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg), lambda out: out.logits


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=2, n_positions=32, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg), lambda out: out.logits


# Sampled projections: BERT has q, k, v, attention output, intermediate, output per layer plus the
# pooler (the classifier stays dense); GPT-2 has c_attn, attn c_proj, c_fc, mlp c_proj per layer.
@pytest.mark.parametrize("build, n_sampled", [(_bert, 2 * 6 + 1), (_gpt2, 2 * 4)], ids=["bert", "gpt2"])
def test_hf_model_transform_train_freeze(build, n_sampled):
    torch.manual_seed(0)
    model, logits = build()
    model.eval()
    ids = torch.randint(0, 100, (2, 16))
    gm = nesc.transform(model, (ids,), ratio=2, min_params=1000)
    assert gm.meta["nesc_capture"] == "export"
    report = nesc.summary(gm, print_table=False)
    sampled = [r for r in report.rows if r.state == "sampled"]
    assert len(sampled) == n_sampled, [r.name for r in report.rows]
    assert report.ratio == pytest.approx(2.0, rel=0.02)

    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    target = torch.randint(0, logits(gm(ids)).shape[-1], logits(gm(ids)).shape[:-1])
    losses = []
    for _ in range(4):
        opt.zero_grad()
        out = logits(gm(ids))
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    gm.eval()
    frozen = nesc.freeze(gm)
    torch.testing.assert_close(logits(frozen(ids)), logits(gm(ids)), rtol=1e-5, atol=0)
