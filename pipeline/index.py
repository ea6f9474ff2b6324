"""Scan an audio tree into the lengths JSON (`index.json`): incremental, parallel, atomic."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.audio import is_audio_path, probe
from pipeline.errors import AudioError, PipelineError
from pipeline.fsutil import atomic_write_text, file_sha256
from pipeline.parallel import parallel_map
from pipeline.records import AudioIndex, IndexEntry, Rejection, dumps, load_json


@dataclass
class IndexResult:
    index: AudioIndex
    opened: int  # files opened this run (new or changed); unchanged ones are reused
    reused: int


@dataclass(frozen=True)
class _Found:
    rel: str
    path: str
    bytes: int
    mtime_ns: int


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
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            broken[rel or "."] = Rejection(f"cannot list folder: {exc.strerror}")
            return
        for entry in entries:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            link = entry.is_symlink()
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                entry_real = os.path.realpath(entry.path) if link else f"{real}/{entry.name}"
                if entry_real not in above:  # else a symlink loop: the folder holds itself
                    visit(entry.path, entry_rel, entry_real, above | {entry_real})
                continue
            if not is_audio_path(entry.name):
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                why = f"broken symlink to {os.readlink(entry.path)}" if link else exc.strerror
                broken[entry_rel] = Rejection(why or "cannot stat")
                continue
            entry_real = os.path.realpath(entry.path) if link else f"{real}/{entry.name}"
            if entry_real in canonical_by_real:
                aliases.setdefault(canonical_by_real[entry_real], []).append(entry_rel)
                continue
            canonical_by_real[entry_real] = entry_rel
            found.append(_Found(entry_rel, entry.path, st.st_size, st.st_mtime_ns))

    real_root = os.path.realpath(root)
    visit(str(root), "", real_root, frozenset({real_root}))
    return found, aliases, broken


def _inspect(item: _Found) -> IndexEntry | Rejection:
    """Open one file (runs in a worker process) and return what really decodes, or why not."""
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
        header_frames=info.header_frames if info.header_frames != info.frames else None,
    )


def _unchanged(previous: AudioIndex | None, item: _Found) -> IndexEntry | Rejection | None:
    if previous is None:
        return None
    old = previous.files.get(item.rel) or previous.rejected.get(item.rel)
    if old is not None and (old.bytes, old.mtime_ns) == (item.bytes, item.mtime_ns):
        return old
    return None


def _fingerprint_possible_duplicates(index: AudioIndex, jobs: int, progress: bool) -> None:
    """sha256 every file whose byte size another file shares (exact duplicates share size)."""
    by_size: dict[int, list[str]] = {}
    for rel, entry in index.files.items():
        by_size.setdefault(entry.bytes, []).append(rel)
    todo = [
        rel
        for group in by_size.values()
        if len(group) > 1
        for rel in group
        if index.files[rel].sha256 is None
    ]
    paths = [os.path.join(index.root, rel) for rel in todo]
    for rel, digest in zip(
        todo, parallel_map(file_sha256, paths, jobs, "sha256", progress), strict=True
    ):
        index.files[rel].sha256 = digest


def build_index(
    root: Path | str,
    out: Path | str | None = None,
    jobs: int | None = None,
    lengths_json: Path | str | None = None,
    progress: bool = True,
) -> IndexResult:
    """Index every audio file under `root` and write `out` (default shards/<root name>/index.json).

    Entries of an existing `out` whose size and mtime are unchanged are reused without opening.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise PipelineError(f"{root}: no such directory; pass the folder that holds your audio")
    out = Path(out) if out is not None else default_index_path(root)
    saved = load_json(out, "index") if out.exists() else None
    previous = AudioIndex.from_dict(saved, out) if saved is not None else None
    if previous is not None and Path(previous.root) != root:
        previous = None  # another tree's index: nothing to reuse

    found, aliases, broken = _walk(root)
    if not found and not broken:
        raise PipelineError(
            f"{root}: no audio files (.wav .flac .aif(f) .ogg .opus .mp3) here; check the path"
        )
    results: dict[str, IndexEntry | Rejection] = {}
    todo: list[_Found] = []
    for item in found:
        old = _unchanged(previous, item)
        if old is None:
            todo.append(item)
        else:
            results[item.rel] = old
    jobs = jobs or os.cpu_count() or 1
    results.update(
        zip(
            [t.rel for t in todo],
            parallel_map(_inspect, todo, jobs, "index", progress),
            strict=True,
        )
    )

    index = AudioIndex(root=str(root), rejected=dict(broken))
    for rel in sorted(results):
        result = results[rel]
        if isinstance(result, IndexEntry):
            result.aliases = aliases.get(rel, [])
            index.files[rel] = result
        else:
            index.rejected[rel] = result
    _fingerprint_possible_duplicates(index, jobs, progress)
    if index.to_dict() != saved:
        index.save(out)
    if lengths_json is not None:
        atomic_write_text(Path(lengths_json), dumps(index.lengths()))
    return IndexResult(index, opened=len(todo), reused=len(found) - len(todo))
