"""`verify DIR`: a shard set against its manifest and, optionally, against its source audio."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.audio import ReaderPool
from pipeline.codec import int16_to_pcm16
from pipeline.errors import AudioError
from pipeline.fsutil import file_sha256
from pipeline.records import ChunkMeta, Manifest
from pipeline.tario import ALLOWED_EXTENSIONS, iter_members, load_npy


def iter_samples(path: Path, problems: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {".npy": ..., ".json": ...}) per sample of one shard; anomalies go to `problems`."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        for name, data in iter_members(path):
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

    def chunk(self, rel: str, start: int) -> np.ndarray:
        path = os.path.join(self.manifest.root, rel)
        cap = self.manifest.truncated.get(rel)
        block = self.readers.read(path, start, self.manifest.config.chunk_frames, cap)
        return int16_to_pcm16(block)


def verify(folder: Path | str, against_source: bool = False, progress: bool = True) -> list[str]:
    """Every problem of the shard set in `folder`, one line each; empty when it is intact."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    frames = manifest.config.chunk_frames
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    sources = _Sources(manifest) if against_source else None
    shards = [(split, info) for split, infos in manifest.shards.items() for info in infos]
    for split, info in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        path = folder / info.path
        if not path.is_file():
            problems.append(f"{path}: missing (the manifest lists it); re-run shard")
            continue
        if path.stat().st_size != info.bytes or file_sha256(path) != info.sha256:
            problems.append(f"{path}: sha256 or size differs from the manifest; re-run shard")
        count = 0
        for key, members in iter_samples(path, problems):
            if key in first_seen:
                problems.append(f"{path}: key {key} also in {first_seen[key]}")
            first_seen[key] = info.path
            decoded = decode_sample(path, key, members, frames, problems)
            if decoded is None:
                continue
            count += 1
            tokens, meta = decoded
            if meta.split != split:
                problems.append(f"{path}: sample {key} says split {meta.split!r}, is in {split}")
            if sources is None:
                continue
            try:
                expected = sources.chunk(meta.source, meta.start)
            except AudioError as exc:
                problems.append(f"{path}: sample {key}: source {meta.source}: {exc}")
                continue
            if not np.array_equal(tokens, expected):
                problems.append(
                    f"{path}: sample {key} differs from {meta.source} at frame {meta.start}"
                )
        if count != info.samples:
            problems.append(f"{path}: holds {count} samples, the manifest says {info.samples}")
    return problems
