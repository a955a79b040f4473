"""nesc.serialize.loader: what ``load`` gives back (metadata, train/eval), and every check it makes on
a file, each failing with an ``ArtifactError`` that says what is wrong and how to fix it."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from nesc.core import names
from nesc.serialize import EXTRA, FORMAT_VERSION, READABLE_VERSIONS, load
from serialize_cases import SHAPE, load_error, rewrite_metadata


def test_metadata_comes_back(saved):
    _, path = saved
    loaded = load(path)
    assert loaded.meta[EXTRA] == {"report": {"ratio": 0.25, "layers": ["conv"]}}
    assert loaded.meta[names.INPUT_SPECS] == [(SHAPE, "float32")]


def test_train_and_eval_switch_dropout_and_batch_norm(saved):
    gm, path = saved
    loaded = load(path)
    x = torch.randn(*SHAPE)
    tracked = loaded.get_buffer("bn.num_batches_tracked")
    before = int(tracked)
    assert torch.equal(loaded(x), loaded(x))  # eval: deterministic, statistics untouched
    assert int(tracked) == before
    loaded.train()
    assert not torch.equal(loaded(x), loaded(x))  # dropout draws a new mask every call
    assert int(tracked) == before + 2
    assert not torch.equal(loaded.get_buffer("bn.running_mean"), gm.get_buffer("bn.running_mean"))
    loaded.eval()
    assert torch.equal(loaded(x), loaded(x))


# ------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.nesc")
    assert "nope.nesc" in msg and "no such file" in msg


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.nesc"
    path.write_text("these are my notes, not a model\n" * 4)
    assert "not a readable safetensors file" in load_error(path)


def test_truncated_file(regenerate_file, tmp_path):
    path = tmp_path / "cut.nesc"
    path.write_bytes(regenerate_file.read_bytes()[:-16])
    msg = load_error(path)
    assert "not a readable safetensors file" in msg and "truncated" in msg


def test_flipped_byte_in_tensor_data(regenerate_file, tmp_path):
    raw = bytearray(regenerate_file.read_bytes())
    raw[-3] ^= 0xFF
    path = tmp_path / "flipped.nesc"
    path.write_bytes(bytes(raw))
    msg = load_error(path)
    assert "sha256" in msg and "tampered" in msg


def test_plain_safetensors_file_is_not_a_nesc_artifact(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    msg = load_error(path)
    assert "not a nesc artifact" in msg and "safetensors.torch.load_file" in msg


def test_newer_format_version(regenerate_file, tmp_path):
    path = tmp_path / "future.nesc"
    rewrite_metadata(regenerate_file, path, format_version=str(FORMAT_VERSION + 1), nesc_version="9.0")
    msg = load_error(path)
    assert f"format_version '{FORMAT_VERSION + 1}'" in msg  # what the file has
    assert f"reads format_version {', '.join(map(str, READABLE_VERSIONS))}" in msg  # what this nesc reads
    assert "nesc 9.0" in msg and "re-save" in msg  # how to fix
