"""Writing files safely: nothing is replaced silently, nothing is left half-written.

Every file nesc writes (artifacts, checkpoints, weights, ONNX files, deploy libraries and their
parameters) goes through ``check_output`` before the work starts and ``atomic_write`` at the end:

* an existing file is replaced only with ``overwrite=True`` (the CLI's ``--force``);
* a symlink, a directory, a device or any other non-regular file is never written to or replaced;
* the folder must exist and be writable, checked before the (possibly long) work;
* the data goes to a temporary file in the same folder, is flushed and ``fsync``-ed, and only then
  renamed over the target (and the folder entry ``fsync``-ed), so a crash or a full disk leaves the
  old file (or nothing) under the name, never a truncated one; the temporary file is removed on error.

Every failure is an ``OutputError`` that says which path, what is wrong and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

CHUNK = 1 << 20


def check_output(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse ``path`` now, before any work, if writing it later would fail or replace something silently."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # the folder check below says which
        st = None
    except OSError as e:
        raise OutputError(f"{what} {str(path)!r}: cannot inspect it ({e.strerror}); pass another path") from e
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{what} {str(path)!r} is a symbolic link; nesc does not write through links. "
                              f"Pass the real path ({os.path.realpath(path)!r}) or another one.")
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {str(path)!r} is a directory; pass a file path inside it, e.g. "
                              f"{str(path / 'model')!r}")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {str(path)!r} exists and is not a regular file (a device, socket or "
                              f"pipe); nesc writes regular files only. Pass another path.")
        if not overwrite:
            raise OutputError(f"{what} {str(path)!r} already exists; pass overwrite=True (command line: "
                              f"--force) to replace it, or choose another path")
    folder = path.parent
    if not folder.is_dir():
        if folder.exists():
            raise OutputError(f"{what} {str(path)!r}: {str(folder)!r} is a file, not a folder; pass a path in a "
                              f"folder")
        raise OutputError(f"{what} {str(path)!r}: folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(path)!r}: folder {str(folder)!r} is not writable; pass a path you can "
                          f"write to")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                 what: str = "output") -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then move it into place.

    ``write`` may use any library that writes to a path (safetensors, onnx, TVM). The target is
    checked again just before the rename, so a file that appeared meanwhile is not replaced silently.
    """
    path = check_output(path, overwrite=overwrite, what=what)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:  # a full disk, a folder that became read-only
        raise OutputError(_os_message(path, e, what)) from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        _fsync_file(tmp)
        check_output(path, overwrite=overwrite, what=what)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(_os_message(path, e, what)) from e
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; otherwise nothing half-written stays behind
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False, what: str = "output") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, what=what)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - nor fsync them
        pass
    finally:
        os.close(fd)


def _os_message(path: Path, e: OSError, what: str) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{what} {str(path)!r}: the disk is full ({e.strerror}); nothing was written under that name. "
                f"Free some space or write elsewhere.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what} {str(path)!r}: permission denied ({e.strerror}); write somewhere you may write."
    return f"{what} {str(path)!r}: writing failed ({e.strerror or e}); nothing was written under that name."
