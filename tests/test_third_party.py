"""Models nobody here wrote: Hugging Face transformers built from small configs (nothing downloads).

They defeat torch.fx.symbolic_trace, so they exercise the export capture path end to end: capture,
find every projection (nn.Linear in BERT, GPT-2's Conv1D as addmm against an (I, O) parameter) and
embedding table (GPT-2's tied with its lm_head), train, freeze with parity, save and load.
"""

from __future__ import annotations

import pytest
import torch

import nesc
from nesc.core import names

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


# Sampled weights: BERT has q, k, v, attention output, intermediate, output per layer plus the
# pooler (the classifier stays dense), and its word and position embeddings (the 2 x 64 token-type
# table is under min_params); GPT-2 has c_attn, attn c_proj, c_fc, mlp c_proj per layer, its position
# embedding and its token embedding, which lm_head reads too (tied: one weight, one sampler). The tied
# lm_head is not a weight of its own, so keep_classifier keeps the last weight that is (the last
# c_proj) dense: 2 * 4 + 2 - 1.
@pytest.mark.parametrize("build, n_sampled", [(_bert, 2 * 6 + 1 + 2), (_gpt2, 2 * 4 + 2 - 1)], ids=["bert", "gpt2"])
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
    assert {r.op for r in sampled if "embeddings" in r.name or r.name.endswith(("wte.weight", "wpe.weight"))} == {"embedding"}

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


def test_gpt2_tied_embedding_and_lm_head_read_one_sampled_weight(tmp_path):
    torch.manual_seed(0)
    model, logits = _gpt2()
    model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 16))
    gm = nesc.transform(model, (ids,), ratio=2, min_params=1000, keep_classifier=False)
    report = nesc.summary(gm, print_table=False)
    assert [r.name for r in report.rows if r.state != "sampled"] == []
    (wte,) = [n for n in gm.graph.nodes if n.meta.get(names.SAMPLED_WEIGHT) == "transformer.wte.weight"]
    consumers = {u.target for u in wte.users}
    assert consumers == {torch.ops.aten.embedding.default, torch.ops.aten.linear.default}, consumers
    params = dict(gm.named_parameters(remove_duplicate=False))
    assert "transformer.wte.weight" not in params and "lm_head.weight" not in params
    gm.eval()
    frozen = nesc.freeze(gm)
    torch.testing.assert_close(logits(frozen(ids)), logits(gm(ids)), rtol=1e-5, atol=0)
    nesc.save(frozen, tmp_path / "gpt2.nesc")
    loaded = nesc.load(tmp_path / "gpt2.nesc")
    torch.testing.assert_close(logits(loaded(ids)), logits(frozen(ids)), rtol=1e-5, atol=1e-6)


def _bit():  # weight-standardised convolutions (batch norm applied to each weight)
    cfg = transformers.BitConfig(embedding_size=64, hidden_sizes=[128, 256], depths=[1, 1], layer_type="bottleneck")
    return transformers.BitModel(cfg), (torch.randn(2, 3, 32, 32),)


def _wav2vec2():  # positional conv under torch.nn.utils.parametrizations.weight_norm
    cfg = transformers.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, conv_dim=(32, 32),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )
    return transformers.Wav2Vec2Model(cfg), (torch.randn(2, 800),)


def _efficientnet():  # padding="same" convolutions (aten.conv2d.padding)
    cfg = transformers.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)
    return transformers.EfficientNetModel(cfg), (torch.randn(2, 3, 32, 32),)


def _computed_or_padded(gm) -> set[str]:
    """Weights read through a computation (weight standardisation, weight norm) or by a string-padded conv."""
    infos = [n.meta[names.WEIGHT] for n in gm.graph.nodes if names.WEIGHT in n.meta
             if n.meta[names.WEIGHT].computed or n.target is torch.ops.aten.conv2d.padding]
    return {i.weight_name for i in infos if i.state == "sampled"}


# BiT: every conv is weight-standardised (9); wav2vec2: its positional conv's weight norm ``v``
# (``g`` stays dense); EfficientNet: every sampled conv is padding="same" (or "valid" after an
# explicit pad) at this size (17; the others are under min_params).
@pytest.mark.parametrize("build, n_sampled", [(_bit, 9), (_wav2vec2, 1), (_efficientnet, 17)],
                         ids=["bit", "wav2vec2", "efficientnet"])
def test_computed_and_string_padded_weights_are_sampled(build, n_sampled, tmp_path):
    torch.manual_seed(0)
    model, x = build()
    gm = nesc.transform(model.eval(), x, ratio=4)
    assert len(_computed_or_padded(gm)) == n_sampled, _computed_or_padded(gm)
    assert nesc.summary(gm, print_table=False).ratio == pytest.approx(4.0, rel=0.03)
    gm.eval()
    frozen = nesc.freeze(gm)
    expected = gm(*x).last_hidden_state
    torch.testing.assert_close(frozen(*x).last_hidden_state, expected, rtol=1e-5, atol=1e-6)
    nesc.save(frozen, tmp_path / "m.nesc")
    torch.testing.assert_close(nesc.load(tmp_path / "m.nesc")(*x).last_hidden_state, expected, rtol=1e-5, atol=1e-6)


def _trainer_args(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def test_hf_model_keeps_its_interface_and_trains_under_trainer(tmp_path):
    """Keyword inputs by the original names, any batch and sequence length up to the model's maximum,
    its ModelOutput (with the loss from ``labels``), ``.config``, and transformers.Trainer."""
    pytest.importorskip("accelerate")  # Trainer needs it
    torch.manual_seed(0)
    model, _ = _bert()
    model.eval()
    example = {"attention_mask": torch.ones(2, 16, dtype=torch.long),
               "token_type_ids": torch.zeros(2, 16, dtype=torch.long), "labels": torch.tensor([0, 2])}
    gm = nesc.transform(model, (torch.randint(0, 100, (2, 16)),), example_kwargs=example, ratio=2, min_params=1000)
    assert type(gm.config) is type(model.config) and gm.config.num_labels == 3  # a copy: the model is untouched
    frozen = nesc.freeze(gm)
    assert frozen.config is gm.config and frozen.main_input_name == "input_ids"
    for batch, length in [(1, 5), (3, 32)]:  # 32: max_position_embeddings
        ids = torch.randint(0, 100, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[:, -2:] = 0
        kwargs = {"attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                  "labels": torch.randint(0, 3, (batch,))}
        out = frozen(input_ids=ids, **kwargs)
        assert type(out) is transformers.modeling_outputs.SequenceClassifierOutput
        want = gm.eval()(ids, **kwargs)
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(want.logits, kwargs["labels"]))

    rows = [{"input_ids": torch.randint(0, 100, (16,)), "attention_mask": torch.ones(16, dtype=torch.long),
             "token_type_ids": torch.zeros(16, dtype=torch.long), "labels": torch.tensor(i % 3)} for i in range(4)]
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    result = transformers.Trainer(model=gm.train(), args=_trainer_args(tmp_path), train_dataset=rows).train()
    assert result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in gm.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("pool" in n for n in moved), moved[:5]


def test_gpt2_exports_to_onnx_with_parity(tmp_path) -> None:
    """Causal attention through the exporter's own translation of the fused op: its math-kernel
    decomposition (the fallback for graphs the exporter cannot decompose, full T5) disagreed with the
    model by 4% here."""
    ort = pytest.importorskip("onnxruntime")
    from helpers import assert_backend_close

    torch.manual_seed(0)
    model, logits = _gpt2()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids):
            return logits(self.model(ids))

    ids = torch.randint(0, 100, (2, 16))
    frozen = nesc.freeze(nesc.transform(Logits().eval(), (ids,), ratio=4))
    nesc.export_onnx(frozen, (ids,), tmp_path / "gpt2.onnx")
    session = ort.InferenceSession(str(tmp_path / "gpt2.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        assert_backend_close(got, frozen(ids), "onnxruntime vs eager")
