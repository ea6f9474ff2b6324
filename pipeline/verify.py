"""`verify DIR|s3://bucket/prefix`: a shard set against its manifest and, optionally, against
its source audio (which must be local). Each shard is read once, as a stream: its checksum is
computed over the bytes the tar reader takes, so an object is downloaded once."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from pipeline import storage
from pipeline.audio import ReaderPool
from pipeline.codec import int16_to_pcm16
from pipeline.errors import AudioError
from pipeline.records import ChunkMeta, Manifest
from pipeline.tario import ALLOWED_EXTENSIONS, load_npy

_BLOCK = 1 << 20


class _Hashing:
    """A read-only stream that hashes and counts what is read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.sha256, self.bytes = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (the end-of-archive padding)."""
        while self.read(_BLOCK):
            pass


def _members(stream: IO[bytes] | _Hashing) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every member, in order, read as a stream (b"" for non-files)."""
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for info in tar:
            handle = tar.extractfile(info) if info.isfile() else None
            yield info.name, handle.read() if handle is not None else b""


def iter_samples(
    path: Path | str, problems: list[str], stream: IO[bytes] | _Hashing | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {".npy": ..., ".json": ...}) per sample of one shard, read from `stream` (default:
    the file at `path`, which names the shard in `problems`, where anomalies go)."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with contextlib.ExitStack() as stack:
            if stream is None:
                stream = stack.enter_context(storage.open_read(str(path)))
            for name, data in _members(stream):
                key, dot, ext = name.partition(".")
                ext = dot + ext
                if ext not in ALLOWED_EXTENSIONS or "/" in name:
                    problems.append(
                        f"{path}: member {name!r} is not a .npy/.json sample member; "
                        "re-create the shard"
                    )
                    continue
                members = pending.setdefault(key, {})
                members[ext] = data
                if len(members) == len(ALLOWED_EXTENSIONS):
                    yield key, pending.pop(key)
    except (tarfile.TarError, OSError) as exc:
        problems.append(f"{path}: not a readable tar ({exc}); re-create the shard")
    for key, members in pending.items():
        problems.append(f"{path}: sample {key} lacks {set(ALLOWED_EXTENSIONS) - members.keys()}")


def decode_sample(
    path: Path, key: str, members: dict[str, bytes], chunk_frames: int, problems: list[str]
) -> tuple[np.ndarray, ChunkMeta] | None:
    try:
        tokens = load_npy(members[".npy"])
        meta = ChunkMeta.from_json(members[".json"])
    except (ValueError, TypeError, KeyError) as exc:
        problems.append(f"{path}: sample {key} does not decode ({exc})")
        return None
    if tokens.dtype != np.uint16 or tokens.shape != (2, chunk_frames):
        problems.append(
            f"{path}: sample {key} is {tokens.dtype} {tokens.shape}, expected "
            f"uint16 (2, {chunk_frames})"
        )
        return None
    return tokens, meta


class _Sources:
    """The source audio of a shard set's chunks, read as `shard` read it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.readers = ReaderPool(manifest.config.channels, manifest.config.sample_rate)
        # files an append recorded as gone (`shard --append --prune`): their chunks stay, unread
        self.pruned = {rel for g in manifest.generations for rel in g.pruned}

    def chunk(self, rel: str, start: int) -> np.ndarray:
        path = os.path.join(self.manifest.root, rel)
        cap = self.manifest.truncated.get(rel)
        block = self.readers.read(path, start, self.manifest.config.chunk_frames, cap)
        return int16_to_pcm16(block)


def verify(
    folder: Path | str,
    against_source: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Every problem of the shard set in `folder` (a path or an `s3://` prefix, or its
    manifest.json), one line each; empty when it is intact. `storage_options`: fsspec's."""
    location = storage.manifest_file(os.fspath(folder))
    manifest = Manifest.from_dict(
        storage.read_json(location, "shard manifest", storage_options), location
    )
    folder = storage.parent(location)
    frames = manifest.config.chunk_frames
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    sources = _Sources(manifest) if against_source else None
    shards = [(split, info) for split, infos in manifest.shards.items() for info in infos]
    for split, info in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        path = storage.join(folder, info.path)
        try:
            opened = storage.open_read(path, storage_options)
        except (FileNotFoundError, IsADirectoryError):
            problems.append(f"{path}: missing (the manifest lists it); re-run shard")
            continue
        count = 0
        with opened:
            stream = _Hashing(opened)
            for key, members in iter_samples(path, problems, stream):
                if key in first_seen:
                    problems.append(f"{path}: key {key} also in {first_seen[key]}")
                first_seen[key] = info.path
                decoded = decode_sample(path, key, members, frames, problems)
                if decoded is None:
                    continue
                count += 1
                problems += _sample_problems(path, key, split, decoded, sources)
            stream.drain()
        if (stream.bytes, stream.sha256.hexdigest()) != (info.bytes, info.sha256):
            problems.append(f"{path}: sha256 or size differs from the manifest; re-run shard")
        if count != info.samples:
            problems.append(f"{path}: holds {count} samples, the manifest says {info.samples}")
    return problems


def _sample_problems(
    path: str,
    key: str,
    split: str,
    decoded: tuple[np.ndarray, ChunkMeta],
    sources: _Sources | None,
) -> list[str]:
    """What is wrong with one decoded sample: its split, and (with `sources`) its audio."""
    tokens, meta = decoded
    if meta.split != split:
        return [f"{path}: sample {key} says split {meta.split!r}, is in {split}"]
    if sources is None or meta.source in sources.pruned:
        return []
    try:
        expected = sources.chunk(meta.source, meta.start)
    except AudioError as exc:
        return [f"{path}: sample {key}: source {meta.source}: {exc}"]
    if not np.array_equal(tokens, expected):
        return [f"{path}: sample {key} differs from {meta.source} at frame {meta.start}"]
    return []
