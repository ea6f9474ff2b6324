"""Atomic file writes: nothing half-written ever sits under a final name, and a write that the
disk or the folder refuses is one `DiskError` naming the path and the fix, whichever process
made it (a worker's pickles across the pool as it is)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DiskError

_UMASK = os.umask(0)
os.umask(_UMASK)

_ELSEWHERE = "or pass an output path on another disk"
# What a write into an open file meets (any other OSError there is not the disk's doing).
_FULL = {
    errno.ENOSPC: f"the disk is full: free space there {_ELSEWHERE}",
    errno.EDQUOT: f"the disk quota is used up: free space there {_ELSEWHERE}",
    errno.EFBIG: "the file would pass the file size limit (`ulimit -f`, or the largest file "
    f"the file system takes): raise the limit {_ELSEWHERE}",
    errno.EROFS: f"the file system is read-only: remount it read-write {_ELSEWHERE}",
}
# ... and what creating a folder, a file or a name meets besides.
_REFUSED = {
    **_FULL,
    errno.EACCES: f"permission denied: make the folder writable for this user {_ELSEWHERE}",
    errno.EPERM: f"not permitted (an immutable or protected folder) {_ELSEWHERE}",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a file is in the way of the folder: choose another path",
    errno.EISDIR: "a folder is in the way of the file: choose another path",
}


@contextlib.contextmanager
def _refused(path: Path, reasons: dict[int, str]) -> Iterator[None]:
    """An OSError whose errno is one of `reasons` -> a DiskError naming `path` and the fix."""
    try:
        yield
    except OSError as exc:
        reason = reasons.get(exc.errno)
        if reason is None:
            raise
        raise DiskError(f"{path}: cannot write: {reason}") from exc


def _temp_file(folder: Path, prefix: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds,
    and remove it whatever happens.

    Raises:
        DiskError: the folder cannot be created or written, or the disk refuses a write of the
            block (full, read-only, a size limit); other errors of the block pass unchanged.
    """
    final = Path(final)
    with _refused(final.parent, _REFUSED):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_file(final.parent, f".{final.name}.")
    try:
        with _refused(final, _FULL):
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a final file: the usual mode
            yield Path(tmp)
        with _refused(final, _REFUSED):
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):  # gone already, or a folder that turned read-only
            os.unlink(tmp)


def check_writable(folder: Path) -> None:
    """Raise DiskError now rather than after hours of work when nothing can be written under
    `folder` (read-only, not permitted, a file in the way); a folder not there yet is not
    made. A full disk shows only when it is written to."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    with _refused(folder, _REFUSED):
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        os.unlink(_temp_file(existing, ".write-check."))


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
