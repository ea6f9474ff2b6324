"""Scan an audio tree into the lengths JSON (`index.json`): incremental, parallel, atomic."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from pipeline.audio import is_audio_path, probe
from pipeline.errors import AudioError, PipelineError
from pipeline.fsutil import atomic_write_text, file_sha256
from pipeline.parallel import map_batches
from pipeline.records import AudioIndex, IndexEntry, Rejection, dumps


@dataclass
class IndexResult:
    index: AudioIndex
    opened: int  # files opened this run (new or changed); unchanged ones are reused
    reused: int


class _Found(NamedTuple):
    rel: str
    path: str
    bytes: int
    mtime_ns: int


_NAME = attrgetter("name")


def default_index_path(root: Path) -> Path:
    return Path("shards") / Path(root).resolve().name / "index.json"


def _walk(root: Path) -> tuple[list[_Found], dict[str, list[str]], dict[str, Rejection]]:
    """Audio files under root in sorted order, symlinks followed once; aliases and broken links.

    A file reached through several paths (symlinked folders or files) is listed once under its
    first sorted path; the other paths become its aliases. realpath is called only at symlinks.
    """
    found: list[_Found] = []
    aliases: dict[str, list[str]] = {}
    broken: dict[str, Rejection] = {}
    canonical_by_real: dict[str, str] = {}

    def visit(folder: str, rel: str, real: str, above: frozenset[str]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=_NAME)
        except OSError as exc:
            broken[rel or "."] = Rejection(f"cannot list folder: {exc.strerror}")
            return
        prefix = f"{rel}/" if rel else ""
        for entry in entries:
            name = entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                link = entry.is_symlink()
                entry_real = os.path.realpath(entry.path) if link else f"{real}/{name}"
                if entry_real not in above:  # else a symlink loop: the folder holds itself
                    visit(entry.path, prefix + name, entry_real, above | {entry_real})
                continue
            if not is_audio_path(name):
                continue
            link = entry.is_symlink()
            try:
                st = entry.stat()
            except OSError as exc:
                why = f"broken symlink to {os.readlink(entry.path)}" if link else exc.strerror
                broken[prefix + name] = Rejection(why or "cannot stat")
                continue
            entry_rel = prefix + name
            entry_real = os.path.realpath(entry.path) if link else f"{real}/{name}"
            canonical = canonical_by_real.setdefault(entry_real, entry_rel)
            if canonical is not entry_rel:
                aliases.setdefault(canonical, []).append(entry_rel)
                continue
            found.append(_Found(entry_rel, entry.path, st.st_size, st.st_mtime_ns))

    real_root = os.path.realpath(root)
    visit(str(root), "", real_root, frozenset({real_root}))
    return found, aliases, broken


def _inspect(item: _Found, fingerprint: bool) -> IndexEntry | Rejection:
    """Open one file and return what really decodes, or why not; sha256 it if `fingerprint`."""
    if item.bytes == 0:
        return Rejection("empty file (0 bytes)", 0, item.mtime_ns)
    try:
        info = probe(item.path)
    except AudioError as exc:
        return Rejection(str(exc), item.bytes, item.mtime_ns)
    return IndexEntry(
        frames=info.frames,
        sample_rate=info.sample_rate,
        channels=info.channels,
        subtype=info.subtype,
        format=info.format,
        bytes=item.bytes,
        mtime_ns=item.mtime_ns,
        sha256=file_sha256(item.path) if fingerprint else None,
        header_frames=info.header_frames if info.header_frames != info.frames else None,
    )


def _hash_batch(batch: list[tuple[str, str]]) -> list[str]:
    """sha256 of each (rel, path): hashlib and file reads release the GIL, so threads share it."""
    return [file_sha256(path) for _, path in batch]


def _inspect_batch(batch: list[tuple[_Found, bool]]) -> list[IndexEntry | Rejection]:
    """`_inspect` over a batch of files (runs in this process or a worker)."""
    return [_inspect(item, fingerprint) for item, fingerprint in batch]


def build_index(
    root: Path | str,
    out: Path | str | None = None,
    jobs: int | None = None,
    lengths_json: Path | str | None = None,
    progress: bool = True,
) -> IndexResult:
    """Index every audio file under `root` and write `out` (default shards/<root name>/index.json).

    Entries of an existing `out` whose size and mtime are unchanged are reused without opening,
    and an index that comes out unchanged is not rewritten. Files whose byte size another file
    shares get a sha256 (only those can be exact copies; hashing all would read the corpus again).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise PipelineError(f"{root}: no such directory; pass the folder that holds your audio")
    out = Path(out) if out is not None else default_index_path(root)
    previous = AudioIndex.load(out) if out.exists() else None
    if previous is not None and Path(previous.root) != root:
        previous = None  # another tree's index: nothing to reuse

    found, aliases, broken = _walk(root)
    if not found and not broken:
        raise PipelineError(
            f"{root}: no audio files (.wav .flac .aif(f) .ogg .opus .mp3) here; check the path"
        )
    shared_size = {size for size, n in Counter(item.bytes for item in found).items() if n > 1}
    old = {**previous.rejected, **previous.files} if previous is not None else {}
    results: dict[str, IndexEntry | Rejection] = {}
    todo: list[tuple[_Found, bool]] = []
    for item in found:
        entry = old.get(item.rel)
        if entry is not None and entry.bytes == item.bytes and entry.mtime_ns == item.mtime_ns:
            results[item.rel] = entry
        else:
            todo.append((item, item.bytes in shared_size))
    jobs = jobs or os.cpu_count() or 1
    # Worker processes, not threads: soundfile's lock around sf_open and the GIL serialise most
    # of a probe, so a probe thread beside this one made the first index slower, not faster
    # (docs/benchmarks.md).
    for (item, _), result in map_batches(_inspect_batch, todo, jobs, "index", progress):
        results[item.rel] = result

    index = AudioIndex(root=str(root), rejected=dict(broken))
    unhashed = []  # reused entries whose size a new file now shares
    for rel in sorted(results):
        result = results[rel]
        if isinstance(result, Rejection):
            index.rejected[rel] = result
            continue
        if result.aliases != aliases.get(rel, []):  # a copy: `previous` stays as loaded
            result = replace(result, aliases=aliases.get(rel, []))
        index.files[rel] = result
        if result.sha256 is None and result.bytes in shared_size:
            unhashed.append((rel, os.path.join(root, rel)))
    for (rel, _), digest in map_batches(
        _hash_batch, unhashed, jobs, "sha256", progress, batch=4, threads=True
    ):
        index.files[rel] = replace(index.files[rel], sha256=digest)
    if index != previous:
        index.save(out)
    if lengths_json is not None:
        atomic_write_text(Path(lengths_json), dumps(index.lengths()))
    return IndexResult(index, opened=len(todo), reused=len(found) - len(todo))
