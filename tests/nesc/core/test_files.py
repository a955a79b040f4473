"""nesc.core.files: ``check_output`` refuses, before any work, every path whose writing would replace
something silently or fail (an existing file without overwrite, a link, a folder, a device or pipe, a
missing or read-only folder); ``atomic_write`` leaves the old file or nothing under the name, never a
partial one (a full disk included), and gives the file the mode the umask says."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nesc.core.errors import OutputError
from nesc.core.files import atomic_write, atomic_write_bytes, check_output, sha256_file

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _refused(path: Path, *words: str, overwrite: bool = False) -> str:
    with pytest.raises(OutputError) as info:
        check_output(path, overwrite=overwrite, what="--out")
    msg = str(info.value)
    assert msg.startswith(f"--out {str(path)!r}"), msg  # which flag, which path
    for word in words:
        assert word in msg, f"{word!r} missing from: {msg}"
    return msg


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


# ------------------------------------------------------------------------------------ check_output


def test_a_new_path_in_a_writable_folder_is_fine(tmp_path: Path) -> None:
    assert check_output(str(tmp_path / "m.nesc")) == tmp_path / "m.nesc"


def test_an_existing_file_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "m.nesc").write_bytes(b"old")
    _refused(tmp_path / "m.nesc", "already exists", "overwrite=True", "--force", "another path")
    assert check_output(tmp_path / "m.nesc", overwrite=True) == tmp_path / "m.nesc"


def test_overwrite_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_symlink_is_refused_even_with_overwrite(tmp_path: Path, overwrite: bool) -> None:
    real = tmp_path / "real.bin"
    real.write_bytes(b"keep")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    _refused(link, "symbolic link", str(real), overwrite=overwrite)
    with pytest.raises(OutputError):
        atomic_write_bytes(link, b"new", overwrite=True)
    assert link.is_symlink() and real.read_bytes() == b"keep"


def test_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "nowhere")
    _refused(link, "symbolic link", overwrite=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_is_refused(tmp_path: Path, overwrite: bool) -> None:
    (tmp_path / "out").mkdir()
    _refused(tmp_path / "out", "is a directory", "file path inside it", str(tmp_path / "out" / "model"),
             overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_fifo_is_refused(tmp_path: Path, overwrite: bool) -> None:
    """What ``/dev/null`` is to a writer: not a regular file. A FIFO opened for writing would block."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file", "device", "pipe", "another path", overwrite=overwrite)
    with pytest.raises(OutputError):
        atomic_write_bytes(fifo, b"x", overwrite=True)
    assert fifo.exists() and not fifo.is_file()


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_dev_null_is_refused() -> None:
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", overwrite=True)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    _refused(tmp_path / "no" / "such" / "m.nesc", "folder", str(tmp_path / "no" / "such"), "does not exist",
             "create it first")


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    _refused(tmp_path / "file" / "m.nesc", str(tmp_path / "file"), "is a file, not a folder")


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders: permissions do not bind")
def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _refused(folder / "m.nesc", "not writable", "a path you can write to")
    finally:
        folder.chmod(0o755)


def test_a_folder_the_process_may_not_write_is_refused(tmp_path: Path, monkeypatch) -> None:
    """The read-only case as root sees it: permissions do not bind root, so ask ``os.access`` to say no."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    _refused(tmp_path / "m.nesc", "not writable", "a path you can write to")


# ------------------------------------------------------------------------------------ atomic_write


def test_atomic_write_writes_through_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp != target and not target.exists()  # not visible yet
        tmp.write_bytes(b"data")

    assert atomic_write(target, write) == target
    assert target.read_bytes() == b"data" and not seen[0].exists() and _leftovers(tmp_path) == []
    assert sha256_file(target) == "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_leaves_no_partial_file_and_the_old_one_intact(tmp_path: Path, err: int) -> None:
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")  # some bytes made it, then the disk filled up
        raise OSError(err, os.strerror(err))

    with pytest.raises(OutputError) as info:
        atomic_write(target, write, overwrite=True, what="--out")
    msg = str(info.value)
    assert str(target) in msg and "disk is full" in msg and "nothing was written" in msg and "Free some space" in msg
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_a_full_disk_when_creating_the_temporary_file_is_an_output_error(tmp_path, monkeypatch) -> None:
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(OutputError, match="disk is full"):
        atomic_write_bytes(tmp_path / "m.bin", b"x")
    assert list(tmp_path.iterdir()) == []


def test_permission_denied_while_writing_is_an_output_error(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(OutputError, match="permission denied"):
        atomic_write(tmp_path / "m.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_error_that_is_not_an_os_error_propagates_and_leaves_nothing(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("serializer bug")

    with pytest.raises(RuntimeError, match="serializer bug"):
        atomic_write(tmp_path / "m.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_appeared_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another process, between the first check and the rename

    with pytest.raises(OutputError, match="already exists"):
        atomic_write(target, write)
    assert target.read_bytes() == b"theirs" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_file_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "m.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == mode
