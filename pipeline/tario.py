"""Deterministic tar shards with the standard `tarfile` (webdataset would import torch).

Every member has mtime 0, uid/gid 0, empty owner names and mode 0644, in the order written, so
the same samples give the same bytes. A shard is written under a temporary name, hashed while it
is written, and renamed only when complete.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from pipeline.fsutil import atomic_path

ALLOWED_EXTENSIONS = (".npy", ".json")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(raw: bytes) -> np.ndarray:
    """Decode a `.npy` member; pickled object arrays are refused."""
    return np.load(io.BytesIO(raw), allow_pickle=False)


class _HashingFile(io.RawIOBase):
    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data) -> int:  # type: ignore[override]
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        super().close()


class ShardWriter:
    """`with ShardWriter(final) as w: w.add(key, {".npy": ..., ".json": ...})`; then w.sha256."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.samples = 0
        self.sha256 = ""
        self.bytes = 0

    def __enter__(self) -> ShardWriter:
        self._atomic = atomic_path(self.final)
        tmp = self._atomic.__enter__()
        self._raw = _HashingFile(tmp)
        return self

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; each member is one write of header + data + padding."""
        for ext, data in members.items():
            info = tarfile.TarInfo(key + ext)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            padding = -len(data) % tarfile.BLOCKSIZE
            header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
            self._raw.write(b"".join((header, data, b"\0" * padding)))
        self.samples += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            try:
                if kind is None:  # two zero blocks end the archive, padded to a whole record
                    self._raw.write(b"\0" * (2 * tarfile.BLOCKSIZE))
                    self._raw.write(b"\0" * (-self._raw.bytes % tarfile.RECORDSIZE))
            finally:
                self._raw.close()  # flushes what a failed write left: it may fail again
        except BaseException as error:  # atomic_path removes the file, names a disk's refusal
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        self.sha256, self.bytes = self._raw.sha256.hexdigest(), self._raw.bytes
        self._atomic.__exit__(kind, exc, tb)


def iter_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member, in order."""
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                yield info.name, b""
                continue
            handle = tar.extractfile(info)
            yield info.name, handle.read() if handle is not None else b""
