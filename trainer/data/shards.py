"""Reading chunks out of tar shards: only `.npy` and `.json` members, never a pickle.

A local path opens seekable, so a resume seeks over the members it skips instead of reading
them; any other URL webdataset opens (`pipe:`, `s3://` via a pipe, ...) is read as a stream.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from pipeline.records import ChunkMeta, ShardInfo
from pipeline.tario import ALLOWED_EXTENSIONS, load_npy
from trainer.data.batch import DataError

__all__ = ["DECODED", "Chunk", "ShardSplit", "iter_chunks", "open_tar", "shard_url"]

# Samples decoded from shards in this process (tests count that resume skips without decoding).
DECODED = {"samples": 0}

Chunk = tuple[np.ndarray, tuple[str, int] | None]  # uint16 [2, C], (source, start) or None


def open_tar(url: str) -> tarfile.TarFile:
    """A local path (or file:) opens seekable, so skipped members are seeked over, not read."""
    path = url[5:] if url.startswith("file:") else url
    if "://" not in url and not url.startswith("pipe:") and os.path.exists(path):
        return tarfile.open(path, mode="r:")
    return tarfile.open(fileobj=wds.gopen(url), mode="r|")


def iter_chunks(url: str, skip: int = 0, want_meta: bool = False) -> Iterator[Chunk]:
    """(uint16 `[2, C]`, (source, start) or None) per sample of one shard, from sample `skip`.

    Only `.npy` (never unpickled) and `.json` members are allowed; anything else is refused.
    """
    number, key = -1, None  # sample number of the member being looked at
    pending: dict[str, bytes] = {}
    with open_tar(url) as tar:
        for info in tar:
            name, dot, ext = info.name.partition(".")
            ext = dot + ext
            if ext not in ALLOWED_EXTENSIONS or not info.isfile():
                raise DataError(
                    f"{url}: member {info.name!r} is not .npy/.json; this loader refuses other "
                    "members (pickles included); re-create the shard with `python -m pipeline "
                    "shard`"
                )
            if name != key:
                number, key, pending = number + 1, name, {}
            if number < skip or (ext == ".json" and not want_meta):
                continue  # seeked over (local files) or read past, never decoded
            handle = tar.extractfile(info)
            pending[ext] = handle.read() if handle is not None else b""
            if ".npy" in pending and (".json" in pending or not want_meta):
                chunk = load_npy(pending.pop(".npy"))
                DECODED["samples"] += 1
                meta = None
                if want_meta:
                    record = ChunkMeta.from_json(pending.pop(".json"))
                    meta = (record.source, record.start)
                yield chunk, meta


def _check_chunk(chunk: np.ndarray, url: str, frames: int) -> None:
    if chunk.dtype != np.uint16 or chunk.shape != (2, frames):
        raise DataError(
            f"{url}: a sample is {chunk.dtype} {chunk.shape}, expected uint16 (2, {frames}) as "
            "its manifest says; re-create the shard set"
        )


def shard_url(prefix: str, info: ShardInfo) -> str:
    """Where a manifest's shard is under `prefix` (a folder or any URL webdataset opens)."""
    return f"{prefix.rstrip('/')}/{info.path}"


@dataclass(frozen=True)
class ShardSplit:
    """The shards of one split: their URLs, sample counts (from the manifest), chunk length."""

    urls: list[str]
    samples: list[int]
    chunk_frames: int

    def chunks(self, sequence: Iterable[str], first: int, want_meta: bool) -> Iterator[Chunk]:
        """Chunks of the shards in `sequence` (URLs of this split, repeats allowed) from chunk
        number `first` on; the shards wholly before it are skipped unopened."""
        counts = dict(zip(self.urls, self.samples, strict=True))
        passed = 0
        for url in sequence:
            count = counts[url]
            if passed + count > first:
                for chunk, meta in iter_chunks(url, max(0, first - passed), want_meta):
                    _check_chunk(chunk, url, self.chunk_frames)
                    yield chunk, meta
            passed += count
