"""export_library writes nothing silently: an existing library or parameters file is replaced only
with overwrite=True, links and devices never are, both paths are checked before anything is linked,
and a full disk leaves no file behind. And what it records: every routing map's pool and range."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from tvm_deploy_cases import compiled_registry

from nesc.backends.tvm import export, runtime
from nesc.core.errors import OutputError

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def compiled():
    return compiled_registry("mlp")


def test_existing_files_are_kept_and_nothing_is_linked(compiled, tmp_path: Path, monkeypatch) -> None:
    library = tmp_path / "m.so"
    runtime.params_path(library).write_bytes(b"an older export")  # only the parameters file exists
    monkeypatch.setattr(export.files, "atomic_write", lambda *a, **k: pytest.fail("wrote before checking"))
    with pytest.raises(OutputError, match=r"parameters file .*m\.params\.safetensors' already exists; pass "
                                          r"overwrite=True"):
        compiled.export_library(library)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.params.safetensors"]
    assert runtime.params_path(library).read_bytes() == b"an older export"


def test_overwrite_replaces_both_files(compiled, tmp_path: Path) -> None:
    library = tmp_path / "m.so"
    compiled.export_library(library)
    with pytest.raises(OutputError, match=r"compiled library .*m\.so' already exists"):
        compiled.export_library(library)
    before = runtime.params_path(library).stat().st_ino
    files = compiled.export_library(library, overwrite=True)
    assert runtime.params_path(library).stat().st_ino != before  # a new file, renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.params.safetensors", "m.so"]
    x = compiled.input_specs[0].example(batch=2)
    np.testing.assert_allclose(runtime.load(files.library)(x), compiled(x), rtol=1e-6, atol=1e-6)


def test_links_and_devices_are_never_written_through(compiled, tmp_path: Path) -> None:
    real = tmp_path / "real.so"
    real.write_bytes(b"keep me")
    (tmp_path / "link.so").symlink_to(real)
    with pytest.raises(OutputError, match="is a symbolic link"):
        compiled.export_library(tmp_path / "link.so", overwrite=True)
    assert real.read_bytes() == b"keep me"
    os.mkfifo(runtime.params_path(tmp_path / "fifo.so"))
    with pytest.raises(OutputError, match="is not a regular file"):
        compiled.export_library(tmp_path / "fifo.so", overwrite=True)
    assert not (tmp_path / "fifo.so").exists()


@pytest.mark.parametrize("failing", ["library", "parameters"])
def test_a_full_disk_leaves_no_file_behind(compiled, tmp_path: Path, monkeypatch, failing: str) -> None:
    if failing == "library":
        def link(self, name, **kwargs):  # the linker fills part of the file, then the disk is full
            Path(name).write_bytes(b"\x7fELF half")
            raise NO_SPACE

        monkeypatch.setattr(type(compiled.executable), "export_library", link)
    else:
        def save(path, params, header):
            Path(path).write_bytes(b"half a header")
            raise NO_SPACE

        monkeypatch.setattr(export, "save_params", save)
    with pytest.raises(OutputError, match="the disk is full .*nothing was written under that name"):
        compiled.export_library(tmp_path / "m.so")
    assert list(tmp_path.iterdir()) == []  # no library alone, no .partial file


def test_parameters_changed_since_the_build_are_not_exported(compiled, tmp_path: Path) -> None:
    name = next(n for n, k in compiled.kinds.items() if k == "dense")
    changed = dataclasses.replace(compiled, params=compiled.params | {name: np.zeros(3, np.float32)})
    with pytest.raises(runtime.DeployError, match=rf"tensor {name!r} is float32 \[3\]; the build expects"):
        changed.export_library(tmp_path / "m.so")
    starts = next(n for n, r in compiled.routes.items() if r["role"] == "starts")
    moved = compiled.params[starts].copy()
    moved[0, 0, 0] = compiled.routes[starts]["max"][0] + 1
    with pytest.raises(runtime.DeployError, match="would read outside the pool"):
        dataclasses.replace(compiled, params=compiled.params | {starts: moved}).export_library(tmp_path / "m.so")
    assert list(tmp_path.iterdir()) == []


def test_every_routing_map_records_its_pool_and_range(compiled) -> None:
    routes = compiled.routes
    assert set(routes) == {n for n, k in compiled.kinds.items() if k == "route"}
    for name, route in routes.items():
        pool = compiled.params[route["pool"]]
        assert compiled.kinds[route["pool"]] == "pool" and list(pool.shape) == route["pool_shape"]
        assert list(compiled.params[name].shape) == route["grid"] + [4]
        if route["role"] == "starts":  # linear layers: channel starts wrap in the pool, no spatial freedom
            assert route["max"] == [pool.shape[0] - 1, pool.shape[1] - 1, 0, 0]
            assert (compiled.params[name] >= 0).all() and (compiled.params[name] <= route["max"]).all()
    assert compiled.facts["routes"] == routes and compiled.facts["params"] == list(compiled.params)
