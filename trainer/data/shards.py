"""Reading chunks out of tar shards: only `.npy` and `.json` members, never a pickle.

A local path opens seekable, so a resume seeks over the members it skips instead of reading
them; an `s3://` URL is read as a stream of ranged GETs through fsspec (`pipeline/storage.py`,
with the split's `storage_options`), any other URL webdataset opens (`pipe:`, `http://`) as
webdataset's stream.
Every shard must deliver the samples its manifest lists: `tarfile` ends quietly at a cut on a
member boundary (and, seekable, at a damaged header), so the count is checked at the end, with
the exit status of a pipe. A remote shard that fails is read again (`ReadPolicy.retries`) from
the sample it stopped at; one that still fails stops the run, or with `on_corrupt: skip` its
remaining samples are left out as empty slots, so every count-based position stays where it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import webdataset as wds
from webdataset.gopen import Pipe

from pipeline import storage
from pipeline.records import ChunkMeta, ShardInfo
from pipeline.tario import ALLOWED_EXTENSIONS, load_npy
from trainer.data.batch import DataError

__all__ = [
    "DECODED",
    "ON_CORRUPT",
    "Chunk",
    "ReadPolicy",
    "ShardReadError",
    "ShardSplit",
    "iter_chunks",
    "shard_url",
]

# Samples decoded from shards in this process (tests count that resume skips without decoding).
DECODED = {"samples": 0}
ON_CORRUPT = ("fail", "skip")
# How long a `pipe:` command whose stream broke off is given to exit, so its status is the
# error reported (seconds); then it is stopped.
PIPE_EXIT_S = 2.0

Chunk = tuple[np.ndarray, tuple[str, int] | None]  # uint16 [2, C], (source, start) or None


class ShardReadError(DataError):
    """A shard that could not be read whole: missing, truncated, damaged, or a failing pipe."""


def is_local(url: str) -> bool:
    """A plain path or `file:` URL: read seekable and never retried."""
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def _fix(url: str) -> str:
    """The fix for a shard that cannot be read: verify the set it belongs to."""
    if not is_local(url) and not storage.is_url(url):
        return "check the set where it is stored with `python -m pipeline verify` on its folder"
    folder = url.removeprefix("file:").rsplit("/", 2)[0]
    return f"check the set with `python -m pipeline verify {folder}` and re-create what it names"


def _open(url: str, options: Mapping[str, Any] | None) -> IO[bytes]:
    """The shard's bytes: a local file (seekable), an object's stream (`s3://`, fsspec
    `options`) or the stream webdataset opens for `url`."""
    if storage.is_url(url):
        try:
            return storage.open_read(url, options)
        except FileNotFoundError:
            raise ShardReadError(f"{url}: the shard is missing; {_fix(url)}") from None
    if not is_local(url):
        return wds.gopen(url)
    path = url.removeprefix("file:")
    if not os.path.exists(path):
        raise ShardReadError(f"{url}: the shard is missing; {_fix(url)}")
    return open(path, "rb")


def _pipe_failed(url: str, stream: IO[bytes], wait_s: float | None) -> ShardReadError | None:
    """Close a `pipe:` stream and say so when its command exited with an error status. Its
    status is awaited `wait_s` seconds (None: for good), then the command is stopped."""
    if not isinstance(stream, Pipe):
        return None
    try:
        status = stream.proc.wait(wait_s) if wait_s != 0 else stream.proc.poll()
    except subprocess.TimeoutExpired:
        status = None
    if status is None:
        stream.proc.kill()
        stream.proc.wait()
    stream.ignore_errors = True  # the status is judged here, not by webdataset's close
    stream.close()
    if not status:  # 0, or stopped here: the read itself says what went wrong
        return None
    command = url.removeprefix("pipe:")
    return ShardReadError(
        f"{url}: its command exited with status {status}; check that `{command}` writes the "
        "shard to its output"
    )


def _members(
    url: str, skip: int, want_meta: bool, expected: int | None, options: Mapping[str, Any] | None
) -> Iterator[Chunk]:
    number, key = -1, None  # sample number of the member being looked at
    pending: dict[str, bytes] = {}
    stream = _open(url, options)
    try:
        with tarfile.open(fileobj=stream, mode="r:" if is_local(url) else "r|") as tar:
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
    except GeneratorExit:  # the reader stopped early: nothing to judge
        _pipe_failed(url, stream, wait_s=0)
        raise
    except Exception as exc:  # a failed command is the cause of what the read saw
        failed = _pipe_failed(url, stream, wait_s=PIPE_EXIT_S)
        if failed is not None:
            raise failed from exc
        raise
    finally:
        if not isinstance(stream, Pipe):
            stream.close()
    failed = _pipe_failed(url, stream, wait_s=None)
    if failed is not None:
        raise failed
    if expected is not None and number + 1 != expected:
        raise ShardReadError(
            f"{url}: ended after {number + 1} of the {expected} samples its manifest lists; "
            f"{_fix(url)}"
        )


def iter_chunks(
    url: str,
    skip: int = 0,
    want_meta: bool = False,
    expected: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Chunk]:
    """(uint16 `[2, C]`, (source, start) or None) per sample of one shard, from sample `skip`.

    Only `.npy` (never unpickled) and `.json` members are allowed; anything else is refused.
    With `expected`, a shard that ends before (or after) that many samples is an error. What
    cannot be read (a missing or damaged tar, a failing pipe, a bad `.npy`) is a
    `ShardReadError` naming the shard. `storage_options` are fsspec's, for an `s3://` URL.
    """
    try:
        yield from _members(url, skip, want_meta, expected, storage_options)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ShardReadError(f"{url}: unreadable ({reason}); {_fix(url)}") from exc


@dataclass(frozen=True)
class ReadPolicy:
    """What a reader does when a shard fails: remote ones are read again `retries` times,
    waiting `backoff_s` x 2^attempt; then `on_corrupt`: `fail` stops, `skip` leaves the rest
    of the shard out as empty slots and goes on."""

    on_corrupt: str = "fail"
    retries: int = 3
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.on_corrupt not in ON_CORRUPT:
            raise DataError(f"on_corrupt {self.on_corrupt!r}: use one of {', '.join(ON_CORRUPT)}")
        if self.retries < 0 or self.backoff_s < 0:
            raise DataError(f"read_retries {self.retries}, retry_backoff_s {self.backoff_s}: >= 0")


def _check_chunk(chunk: np.ndarray, url: str, frames: int) -> None:
    if chunk.dtype != np.uint16 or chunk.shape != (2, frames):
        raise DataError(
            f"{url}: a sample is {chunk.dtype} {chunk.shape}, expected uint16 (2, {frames}) as "
            "its manifest says; re-create the shard set"
        )


def shard_url(prefix: str, info: ShardInfo) -> str:
    """Where a manifest's shard is under `prefix` (a folder, `s3://` prefix or any URL
    webdataset opens)."""
    return f"{prefix.rstrip('/')}/{info.path}"


@dataclass(frozen=True)
class ShardSplit:
    """The shards of one split: their URLs, sample counts (from the manifest), chunk length,
    what to do when one fails, and the fsspec options of `s3://` URLs."""

    urls: list[str]
    samples: list[int]
    chunk_frames: int
    policy: ReadPolicy = field(default_factory=ReadPolicy)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def chunks(
        self,
        sequence: Iterable[str],
        first: int,
        want_meta: bool,
        skipped: list[tuple[str, str]] | None = None,
    ) -> Iterator[Chunk | None]:
        """Chunks of the shards in `sequence` (URLs of this split, repeats allowed) from chunk
        number `first` on; the shards wholly before it are skipped unopened. A slot a skipped
        shard left empty is None, and (url, why) is appended to `skipped`."""
        counts = dict(zip(self.urls, self.samples, strict=True))
        passed = 0
        for url in sequence:
            count = counts[url]
            if passed + count > first:
                yield from self._shard(url, max(0, first - passed), count, want_meta, skipped)
            passed += count

    def _shard(
        self,
        url: str,
        skip: int,
        count: int,
        want_meta: bool,
        skipped: list[tuple[str, str]] | None,
    ) -> Iterator[Chunk | None]:
        """Samples skip.. of one shard, read again from where it stopped while retries last."""
        done, failures = skip, 0
        while True:
            try:
                chunks = iter_chunks(url, done, want_meta, count, self.storage_options)
                for chunk, meta in chunks:
                    _check_chunk(chunk, url, self.chunk_frames)
                    done += 1
                    yield chunk, meta
                return
            except ShardReadError as exc:
                if not is_local(url) and failures < self.policy.retries:
                    wait = self.policy.backoff_s * 2**failures
                    failures += 1
                    print(
                        f"warning: {exc}; reading it again from sample {done} in {wait:g} s "
                        f"(retry {failures} of {self.policy.retries})",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(wait)
                    continue
                if self.policy.on_corrupt == "fail":
                    raise
                if skipped is not None:
                    skipped.append((url, f"{exc}; its last {count - done} samples are skipped"))
                for _ in range(count - done):
                    yield None
                return
