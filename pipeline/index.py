"""Scan an audio tree into the lengths JSON (`index.json`): incremental, parallel, atomic.

A multi-stream MP4 (a `.stem.mp4`) is indexed by `stems` mode: `mixture` (stream 0, under the
file's own path), `all` (one entry per stem, `FILE#STEM`), or `sum` (stream 0, with how close the
mixture is to the sum of the stems).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from pipeline.audio import AudioInfo, is_audio_path, probe, split_stream_key, stream_key
from pipeline.errors import AudioError, PipelineError
from pipeline.fsutil import atomic_write_text, file_sha256
from pipeline.mp4audio import INSTALL_HINT, Mp4OpenError, decoder_version, stems_sum_snr_db
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
STEMS_MODES = ("mixture", "all", "sum")
# `--stems sum`: a mixture this far (dB) or more above its residual against the stems' sum
# matches (docs/data.md, "Stems": AAC coding noise of the five streams, with a margin).
STEMS_SUM_MIN_DB = 20.0
_Inspected = list[tuple[str, IndexEntry | Rejection]]  # (index key, record) per key of a file


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


def entry_sha256(digest: str, key: str) -> str:
    """An entry's sha256: the file's, or for one stem of it the sha256 of the file's digest and
    `#STEM`, so that the stems of one file are never taken for copies of each other."""
    stem = split_stream_key(key)[1]
    return digest if stem is None else hashlib.sha256(f"{digest}#{stem}".encode()).hexdigest()


def _entry(item: _Found, info: AudioInfo, digest: str | None, key: str) -> IndexEntry:
    return IndexEntry(
        frames=info.frames,
        sample_rate=info.sample_rate,
        channels=info.channels,
        subtype=info.subtype,
        format=info.format,
        bytes=item.bytes,
        mtime_ns=item.mtime_ns,
        sha256=entry_sha256(digest, key) if digest is not None else None,
        header_frames=info.header_frames if info.header_frames != info.frames else None,
        streams=len(info.stems) if len(info.stems) > 1 else None,
        stems=list(info.stems) if len(info.stems) > 1 else [],
        decoder=info.decoder,
    )


def _inspect(item: _Found, fingerprint: bool, stems: str) -> _Inspected:
    """Open one file and return what really decodes under each of its keys (one, or one per stem
    with `stems="all"`), or why not; sha256 it if `fingerprint`."""
    if item.bytes == 0:
        return [(item.rel, Rejection("empty file (0 bytes)", 0, item.mtime_ns))]
    try:
        info = probe(item.path)
        keyed = [(item.rel, info)]
        if stems == "all" and len(info.stems) > 1:
            keyed = [(stream_key(item.rel, n), probe(stream_key(item.path, n))) for n in info.stems]
        snr = stems_sum_snr_db(item.path) if stems == "sum" and len(info.stems) > 1 else None
    except AudioError as exc:
        return [(item.rel, Rejection(str(exc), item.bytes, item.mtime_ns))]
    digest = file_sha256(item.path) if fingerprint else None
    entries = [(key, _entry(item, i, digest, key)) for key, i in keyed]
    if snr is not None:
        entries[0][1].stems_sum_db = round(min(snr, 999.0), 2)
    return entries


def _hash_batch(batch: list[tuple[str, str]]) -> list[str]:
    """sha256 of each (rel, path): hashlib and file reads release the GIL, so threads share it."""
    return [file_sha256(path) for _, path in batch]


def _inspect_batch(batch: list[tuple[_Found, bool, str]]) -> list[_Inspected]:
    """`_inspect` over a batch of files (runs in this process or a worker)."""
    return [_inspect(item, fingerprint, stems) for item, fingerprint, stems in batch]


def _reusable(
    records: dict[str, IndexEntry | Rejection], item: _Found, stems: str
) -> dict[str, IndexEntry | Rejection] | None:
    """The previous run's records of an unchanged file, when they are what `stems` mode and the
    installed decoder would write; None when the file must be opened again."""
    if not records or any(
        (r.bytes, r.mtime_ns) != (item.bytes, item.mtime_ns) for r in records.values()
    ):
        return None
    first = next(iter(records.values()))
    if isinstance(first, Rejection):
        # a file rejected for want of PyAV is looked at again: it may be installed now
        return records if INSTALL_HINT not in first.reason and list(records) == [item.rel] else None
    if first.decoder is not None:
        try:
            if first.decoder != decoder_version():
                return None
        except Mp4OpenError:
            return None
    many = len(first.stems) > 1
    keys = [stream_key(item.rel, n) for n in first.stems] if many and stems == "all" else [item.rel]
    summed = many and stems == "sum"
    if sorted(records) != sorted(keys) or (first.stems_sum_db is not None) != summed:
        return None
    return records


def stems_sum_lines(index: AudioIndex) -> list[str]:
    """One line per file checked by `--stems sum`: its mixture-to-residual ratio and verdict."""
    lines = []
    for rel, entry in sorted(index.files.items()):
        if entry.stems_sum_db is not None:
            verdict = "matches" if entry.stems_sum_db >= STEMS_SUM_MIN_DB else "DIFFERS"
            lines.append(
                f"stems: {rel}: mixture vs sum of {len(entry.stems) - 1} stems: "
                f"{entry.stems_sum_db:.1f} dB, {verdict} (>= {STEMS_SUM_MIN_DB:g} dB matches)"
            )
    return lines


def build_index(
    root: Path | str,
    out: Path | str | None = None,
    jobs: int | None = None,
    lengths_json: Path | str | None = None,
    progress: bool = True,
    stems: str = "mixture",
) -> IndexResult:
    """Index every audio file under `root` and write `out` (default shards/<root name>/index.json).

    Entries of an existing `out` whose size and mtime are unchanged are reused without opening,
    and an index that comes out unchanged is not rewritten. Files whose byte size another file
    shares get a sha256 (only those can be exact copies; hashing all would read the corpus again).
    `stems` (mixture, all, sum): how multi-stream MP4 files are indexed (module docstring).
    """
    if stems not in STEMS_MODES:
        raise PipelineError(f"--stems {stems!r}: expected one of {', '.join(STEMS_MODES)}")
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
            f"{root}: no audio files (.wav .flac .aif(f) .ogg .opus .mp3 .m4a .mp4 .aac) here; "
            "check the path"
        )
    shared_size = {size for size, n in Counter(item.bytes for item in found).items() if n > 1}
    old: dict[str, dict[str, IndexEntry | Rejection]] = {}  # file -> its records by key
    if previous is not None:
        for key, record in {**previous.rejected, **previous.files}.items():
            old.setdefault(split_stream_key(key)[0], {})[key] = record
    results: dict[str, IndexEntry | Rejection] = {}
    todo: list[tuple[_Found, bool, str]] = []
    for item in found:
        kept = _reusable(old.get(item.rel, {}), item, stems)
        if kept is not None:
            results.update(kept)
        else:
            todo.append((item, item.bytes in shared_size, stems))
    jobs = jobs or os.cpu_count() or 1
    # Worker processes, not threads: soundfile's lock around sf_open and the GIL serialise most
    # of a probe, so a probe thread beside this one made the first index slower, not faster
    # (docs/benchmarks.md).
    for _, inspected in map_batches(_inspect_batch, todo, jobs, "index", progress):
        results.update(inspected)

    index = AudioIndex(root=str(root), rejected=dict(broken))
    unhashed: dict[str, list[str]] = {}  # file -> keys of reused entries whose size is now shared
    for key in sorted(results):
        result = results[key]
        if isinstance(result, Rejection):
            index.rejected[key] = result
            continue
        file, stem = split_stream_key(key)
        paths = [a if stem is None else stream_key(a, stem) for a in aliases.get(file, [])]
        if result.aliases != paths:  # a copy: `previous` stays as loaded
            result = replace(result, aliases=paths)
        index.files[key] = result
        if result.sha256 is None and result.bytes in shared_size:
            unhashed.setdefault(file, []).append(key)
    files = [(file, os.path.join(root, file)) for file in unhashed]
    for (file, _), digest in map_batches(
        _hash_batch, files, jobs, "sha256", progress, batch=4, threads=True
    ):
        for key in unhashed[file]:
            index.files[key] = replace(index.files[key], sha256=entry_sha256(digest, key))
    if index != previous:
        index.save(out)
    if lengths_json is not None:
        atomic_write_text(Path(lengths_json), dumps(index.lengths()))
    return IndexResult(index, opened=len(todo), reused=len(found) - len(todo))
