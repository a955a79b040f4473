"""nesc.serialize.container: format 3 packs tensors bit-exactly and bounds what a file can make it
inflate or allocate; files of formats 1 and 2 (written before it) still load through every check; the
digest still covers the whole file."""

from __future__ import annotations

import json
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from nesc.core.errors import NescWarning
from nesc.serialize import EXTRA, FROZEN_VERSION, container, load, save
from nesc.serialize.container import Invalid, inflate, pack, unpack
from nesc.serialize.tensors import digest
from serialize_cases import (SHAPE, assert_same_tensors, graph_doc, header, load_error, read_artifact, rewrite,
                             rewrite_metadata, with_graph)

# Written by nesc.save before format 3 (serialize_cases' ConvNet with a regenerate node, seed 0, the
# ``artifacts`` fixture's extra); named .safetensors, which it is, since .gitignore keeps *.nesc out.
V2_FILE = Path(__file__).parent / "data" / "convnet_v2.safetensors"
DOCS = {"graph": '{"nodes":[]}', "tensors": "{}", "input_specs": "[]", "extra": "{}"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "a.half": torch.randn(5, generator=g).to(torch.bfloat16),
        "b.starts": torch.randint(0, 9, (2, 1, 4), generator=g, dtype=torch.int32),
        "b.count": torch.tensor(7, dtype=torch.int64),  # 0-dim
        "c.mask": torch.rand(6, generator=g) > 0.5,
        "c.empty": torch.zeros(0, 3),
        "c.byte": torch.tensor([1, 2, 3], dtype=torch.uint8),  # 3 bytes: the next tensor starts unaligned
        "d.double": torch.randn(2, generator=g, dtype=torch.float64),
    }


def _blobs(documents: dict | None = None, stored: dict | None = None) -> dict[str, torch.Tensor]:
    return pack(documents or DOCS, _tensors() if stored is None else stored)


def _with_documents(blobs: dict, raw: bytes) -> dict:
    return {**blobs, "documents": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}


def _documents_text(blobs: dict) -> dict:
    return json.loads(zlib.decompress(blobs["documents"].numpy().tobytes()))


# ---------------------------------------------------------------------------------- round trip


def test_pack_and_unpack_are_bit_exact_for_every_kind_of_tensor() -> None:
    stored = _tensors()
    documents, back = unpack(_blobs(stored=stored))
    assert {k: documents[k] for k in DOCS} == DOCS
    assert back.keys() == stored.keys()
    for name, t in stored.items():
        got = back[name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), name
        assert torch.equal(got, t), name
        assert got.numel() == 0 or got.data_ptr() % 64 == 0, f"{name}: not in aligned memory of its own"


def test_an_artifact_holds_two_byte_tensors_and_loads_back_bit_exact(artifacts) -> None:
    gm, path = artifacts["regenerate"]
    raw = header(path)
    assert sorted(raw) == ["__metadata__", "data", "documents"]
    _, stored = read_artifact(path)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == raw["data"]["shape"][0]
    loaded = load(path)
    assert_same_tensors(gm, loaded)
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), gm(x))


# --------------------------------------------------------------------------------- old formats


def test_a_format_2_file_written_before_format_3_still_loads(artifacts, tmp_path) -> None:
    gm, _ = artifacts["regenerate"]  # the same model, built the same way (seed 0)
    assert header(V2_FILE)["__metadata__"]["format_version"] == "2"
    loaded = load(V2_FILE)
    assert loaded.meta[EXTRA] == {"report": {"ratio": 0.25, "layers": ["conv"]}}
    assert_same_tensors(gm, loaded)
    # Its gain, a number in the graph before format 4, comes back as the routing map's buffer.
    (scale,) = [n.args[3] for n in loaded.graph.nodes if n.target is torch.ops.nesc.regenerate.default]
    assert scale.op == "get_attr" and loaded.state_dict()[scale.target].dtype == torch.float64
    assert float(loaded.get_buffer(scale.target)) == 1.0
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), gm(x))
    save(loaded, tmp_path / "v3.nesc")  # re-saving writes the current format
    assert header(tmp_path / "v3.nesc")["__metadata__"]["format_version"] == str(FROZEN_VERSION)
    assert torch.equal(load(tmp_path / "v3.nesc")(x), loaded(x))


def test_a_format_1_file_loads_with_a_warning(tmp_path) -> None:
    rewrite_metadata(V2_FILE, tmp_path / "v1.nesc", format_version="1")  # digest over the tensors only
    with pytest.warns(NescWarning, match="format_version 1"):
        loaded = load(tmp_path / "v1.nesc")
    assert "nesc_pool_0" in dict(loaded.named_parameters())


@pytest.mark.parametrize("scale, expected", [("1.0", "must be a finite number"), (None, "must be a finite number"),
                                             (True, "must be a finite number")])
def test_an_old_files_numeric_gain_is_checked_before_it_becomes_a_buffer(tmp_path, scale, expected) -> None:
    doc = graph_doc(V2_FILE)
    node = next(n for n in doc["nodes"] if n.get("target") == "nesc::regenerate.default")
    node["args"][3] = scale
    rewrite(V2_FILE, tmp_path / "edited.nesc", metadata=with_graph(doc))
    assert expected in load_error(tmp_path / "edited.nesc")


def test_a_current_file_must_store_its_gain(tmp_path, regenerate_file) -> None:
    """From format 4 a numeric gain in the graph is refused: the gain is a tensor of the routing map."""
    doc = graph_doc(regenerate_file)
    node = next(n for n in doc["nodes"] if n.get("target") == "nesc::regenerate.default")
    node["args"][3] = 1.0
    rewrite(regenerate_file, tmp_path / "edited.nesc", metadata=with_graph(doc))
    assert "scale must be read from a stored tensor" in load_error(tmp_path / "edited.nesc")


def test_a_format_2_file_goes_through_every_check(tmp_path) -> None:
    doc = graph_doc(V2_FILE)
    out = next(n for n in doc["nodes"] if n["op"] == "output")
    doc["nodes"].insert(doc["nodes"].index(out), {"op": "call_function", "name": "leak",
                                                  "target": "aten::from_file.default", "args": ["/etc/passwd"]})
    rewrite(V2_FILE, tmp_path / "edited.nesc", metadata=with_graph(doc))
    assert header(tmp_path / "edited.nesc")["__metadata__"]["format_version"] == "2"
    assert "aten::from_file is not on nesc's allow-list" in load_error(tmp_path / "edited.nesc")


# ------------------------------------------------------------------------------ decompression


def test_inflate_stops_at_its_limit() -> None:
    text = json.dumps({"x": "y" * 1000}).encode()
    assert inflate(zlib.compress(text), len(text)) == text.decode()
    with pytest.raises(Invalid, match="inflate to more than"):
        inflate(zlib.compress(text), len(text) - 1)


def test_a_decompression_bomb_is_refused_without_inflating_it() -> None:
    limit = 1 << 20
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
    tracemalloc.start()
    try:
        with pytest.raises(Invalid, match="decompression bomb"):
            inflate(bomb, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, f"inflating allocated {peak:,} bytes for a limit of {limit:,}"


def test_an_artifact_whose_documents_are_a_bomb_is_refused(regenerate_file, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(container, "MAX_DOCUMENTS_BYTES", 1 << 20)
    data = regenerate_file.read_bytes()
    meta, blobs = dict(header(regenerate_file)["__metadata__"]), dict(load_tensors(data))
    blobs = _with_documents(blobs, zlib.compress(bytes(64 << 20), 9))
    meta["sha256"] = digest(blobs, {k: v for k, v in meta.items() if k != "sha256"})  # as an attacker would
    (tmp_path / "bomb.nesc").write_bytes(save_tensors(blobs, metadata=meta))
    tracemalloc.start()
    try:
        msg = load_error(tmp_path / "bomb.nesc")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "invalid artifact" in msg and "inflate to more than 1,048,576 bytes" in msg
    assert peak < 8 << 20, f"refusing the bomb allocated {peak:,} bytes"


@pytest.mark.parametrize("raw, expected", [
    (b"not zlib at all", "not a zlib stream"),
    (zlib.compress(b'{"graph": "{}"}')[:-3], "truncated"),
    (zlib.compress(b"{}") + b"more", "followed by other bytes"),
    (zlib.compress(b"\xff\xfe{}"), "not UTF-8"),
    (zlib.compress(b"{not json"), "not JSON"),
    (zlib.compress(b"[" * 100_000), "not JSON"),
    (zlib.compress(b"[]"), "must be an object with the keys"),
    (zlib.compress(json.dumps({**DOCS, "layout": "[]", "code": "x"}).encode()), "must be an object with the keys"),
    (zlib.compress(json.dumps({**DOCS, "layout": [], "graph": {}}).encode()), "(JSON text) must be str"),
], ids=["not-zlib", "truncated", "trailing", "not-utf8", "not-json", "deep", "not-object", "extra-key", "not-text"])
def test_damaged_documents_are_refused(raw, expected) -> None:
    with pytest.raises(Invalid, match=expected.replace("(", r"\(").replace(")", r"\)")):
        unpack(_with_documents(_blobs(), raw))


# -------------------------------------------------------------------------------------- layout


def _with_layout(edit) -> dict:
    """Blobs whose layout document is ``edit(layout)`` while the data stays as packed."""
    blobs = _blobs()
    documents = _documents_text(blobs)
    documents["layout"] = json.dumps(edit(json.loads(documents["layout"])))
    return _with_documents(blobs, zlib.compress(json.dumps(documents).encode()))


def _first(layout, **changes):
    name, dtype, shape = layout[0]
    entry = {"name": name, "dtype": dtype, "shape": shape, **changes}
    return [[entry["name"], entry["dtype"], entry["shape"]], *layout[1:]]


@pytest.mark.parametrize("edit, expected", [
    (lambda lay: lay[:-1], "they must tile it exactly"),
    (lambda lay: lay + [["z.extra", "float32", [1]]], "they must tile it exactly"),
    (lambda lay: _first(lay, shape=[2**40, 2**40]), "they must tile it exactly"),
    (lambda lay: _first(lay, dtype="object"), "is not one safetensors stores"),
    (lambda lay: _first(lay, dtype=["float32"]), "is not one safetensors stores"),
    (lambda lay: _first(lay, shape=[-1]), "is not a list of at most"),
    (lambda lay: _first(lay, shape=[1] * 17), "is not a list of at most"),
    (lambda lay: _first(lay, name="conv..bias"), "not a dotted path"),
    (lambda lay: [lay[0], lay[0], *lay[1:]], "twice"),
    (lambda lay: [lay[0][:2], *lay[1:]], "is not [name, dtype, shape]"),
    (lambda lay: {"a": 1}, "the layout must be list"),
], ids=["short", "long", "huge-shape", "dtype", "dtype-list", "negative", "dims", "name", "twice", "entry", "not-list"])
def test_a_layout_that_does_not_describe_the_data_is_refused(edit, expected) -> None:
    with pytest.raises(Invalid, match=expected.replace("[", r"\[").replace("]", r"\]")):
        unpack(_with_layout(edit))


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    blobs = _blobs(stored={"m": torch.tensor([True, False])})
    blobs["data"] = torch.tensor([1, 2], dtype=torch.uint8)
    with pytest.raises(Invalid, match="bool byte"):
        unpack(blobs)


@pytest.mark.parametrize("blobs, expected", [
    (lambda b: {**b, "more": torch.zeros(1, dtype=torch.uint8)}, "exactly the tensors"),
    (lambda b: {"documents": b["documents"]}, "exactly the tensors"),
    (lambda b: {**b, "data": b["data"].view(torch.float32)}, "stores bytes"),
], ids=["extra-tensor", "no-data", "not-bytes"])
def test_the_file_must_hold_exactly_the_two_byte_tensors(blobs, expected) -> None:
    with pytest.raises(Invalid, match=expected):
        unpack(blobs(_blobs(stored={"w": torch.ones(4)})))


def test_a_document_also_in_the_plain_header_is_refused(regenerate_file, tmp_path) -> None:
    raw = regenerate_file.read_bytes()
    meta = dict(header(regenerate_file)["__metadata__"])
    blobs = dict(load_tensors(raw))
    meta["graph"] = '{"nodes": []}'
    meta["sha256"] = digest(blobs, {k: v for k, v in meta.items() if k != "sha256"})
    (tmp_path / "twice.nesc").write_bytes(save_tensors(blobs, metadata=meta))
    assert "keeps its documents compressed" in load_error(tmp_path / "twice.nesc")


# ---------------------------------------------------------------------------------------- digest


@pytest.mark.parametrize("blob", ["documents", "data"])
def test_a_flipped_byte_in_either_tensor_is_caught_by_the_digest(regenerate_file, tmp_path, blob) -> None:
    raw = bytearray(regenerate_file.read_bytes())
    head = header(regenerate_file)
    start = 8 + int.from_bytes(raw[:8], "little") + head[blob]["data_offsets"][0]
    raw[start + 5] ^= 0x10
    (tmp_path / "flipped.nesc").write_bytes(bytes(raw))
    msg = load_error(tmp_path / "flipped.nesc")
    assert "sha256" in msg and "tampered" in msg


def test_an_edited_plain_entry_is_caught_by_the_digest(regenerate_file, tmp_path) -> None:
    rewrite_metadata(regenerate_file, tmp_path / "edited.nesc", rehash=False, torch_version="9.9")
    assert "tampered" in load_error(tmp_path / "edited.nesc")
