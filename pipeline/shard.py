"""index.json -> uint16 chunk tar shards + manifest.json (see docs/data.md, docs/formats.md).

The whole plan (which chunk of which file lands where in which shard) is computed from the
index before any audio is read, so shards are independent jobs: they run in parallel, a
`--partition i/n` part writes every n-th one, and the bytes never depend on `--jobs`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.audio import ChannelPolicy, ReaderPool, resampled_frames, split_stream_key
from pipeline.codec import int16_to_pcm16
from pipeline.errors import AudioError, PipelineError
from pipeline.fsutil import atomic_write_text, file_sha256
from pipeline.jobarray import resolve_partition
from pipeline.parallel import parallel_map
from pipeline.records import (
    CONFIG_STAMP,
    SPLITS,
    AudioIndex,
    ChunkMeta,
    IndexEntry,
    Manifest,
    ShardConfig,
    ShardInfo,
    dumps,
    load_json,
    recorded_splits,
)
from pipeline.splits import decide_splits, default_test
from pipeline.tario import ShardWriter, npy_bytes

JOURNAL = ".done"  # one small JSON per finished shard, so a re-run resumes where it stopped
# tar header + npy header, and a 512-byte-padded json member with its header, per sample
_SAMPLE_OVERHEAD = 512 + 128 + 1024 + 511


def parse_bytes(spec: str | int) -> int:
    """`256MB`, `1GiB`, `500000` -> bytes."""
    if isinstance(spec, int):
        return spec
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)(i?)[bB]?\s*", spec)
    if not match:
        raise PipelineError(f"size {spec!r}: expected a number with an optional unit, e.g. 256MB")
    base = 1024 if match[3] else 1000
    return int(float(match[1]) * base ** " KMG".index(match[2].upper() or " "))


def choose_sample_rate(index: AudioIndex, files: list[str], sample_rate: str | int | None) -> int:
    """The given rate; or `native` (all files must share one); or the most common by duration."""
    seconds_by_rate: Counter[int] = Counter()
    for rel in files:
        seconds_by_rate[index.files[rel].sample_rate] += index.files[rel].seconds
    if sample_rate not in (None, "native", "auto"):
        rate = int(sample_rate)
        if rate <= 0:
            raise PipelineError(f"--sample-rate {sample_rate}: must be positive")
        return rate
    if sample_rate == "native" and len(seconds_by_rate) > 1:
        rates = ", ".join(f"{r} Hz" for r in sorted(seconds_by_rate))
        raise PipelineError(
            f"--sample-rate native: the selected files have several rates ({rates}); "
            "pass --sample-rate R to resample them to one"
        )
    return max(seconds_by_rate, key=lambda r: (seconds_by_rate[r], r))


@dataclass
class _File:
    rel: str
    entry: IndexEntry
    split: str
    group: str
    chunks: int  # whole chunks at the shard rate
    key: str  # track hash, the first half of every sample key


@dataclass
class _ShardJob:
    """Everything one worker needs to write one shard (picklable)."""

    root: str
    out: str
    path: str  # relative to out
    split: str
    channels: str
    sample_rate: int
    chunk_frames: int
    silence_peak: float
    files: list[tuple[str, int, int, str]]  # (rel, readable native frames, source channels, key)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (file position, chunk number)

    @property
    def seconds(self) -> float:
        return len(self.chunks) * self.chunk_frames / self.sample_rate


def interleave_chunks(
    chunk_counts: list[int], interleave: int, rng: np.random.Generator
) -> np.ndarray:
    """`[n, 2]` (file position, chunk number): the chunks of `interleave` files at a time, mixed.

    Files join the mix in the given order and leave it when their chunks are used up; each step
    takes the next chunk of a random file of the mix (seeded), so a shard mixes many songs while
    only `interleave` files are being read at a time. (The manifest stores it as `window`.)
    """
    total = sum(chunk_counts)
    out = np.empty((total, 2), dtype=np.int64)
    queue = iter([i for i, c in enumerate(chunk_counts) if c > 0])
    active = list(itertools.islice(queue, interleave))
    taken = [0] * len(chunk_counts)
    picks = rng.random(total)
    for n in range(total):
        slot = int(picks[n] * len(active))
        f = active[slot]
        out[n] = (f, taken[f])
        taken[f] += 1
        if taken[f] == chunk_counts[f]:
            nxt = next(queue, None)
            if nxt is None:
                active.pop(slot)
            else:
                active[slot] = nxt
    return out


def _write_shard(job: _ShardJob) -> ShardInfo:
    """Read the planned chunks (random access, a few files open) and write one tar."""
    readers = ReaderPool(job.channels, job.sample_rate)
    errors: dict[str, str] = {}
    silent = failed = 0
    npy_header = npy_bytes(np.zeros((2, job.chunk_frames), np.uint16))[:128]
    with ShardWriter(Path(job.out) / job.path) as writer:
        for position, number in job.chunks:
            rel, frames, channels, key = job.files[position]
            if rel in errors:
                failed += 1
                continue
            start = number * job.chunk_frames
            try:
                path = os.path.join(job.root, rel)
                chunk = readers.read(path, start, job.chunk_frames, cap=frames)
                if chunk.shape[1] != job.chunk_frames:
                    raise AudioError(f"decoded {chunk.shape[1]} of {job.chunk_frames} frames")
            except AudioError as exc:
                errors[rel] = f"{exc} (chunk at frame {start})"
                failed += 1
                continue
            if np.abs(chunk.astype(np.int32)).max() < job.silence_peak:
                silent += 1
                continue
            meta = ChunkMeta(rel, start, job.sample_rate, channels, job.split)
            payload = npy_header + int16_to_pcm16(chunk).tobytes()
            writer.add(f"{key}_{number:06d}", {".npy": payload, ".json": meta.to_json()})
    return ShardInfo(job.path, writer.samples, writer.bytes, writer.sha256, silent, failed, errors)


@dataclass
class ShardPlan:
    config: ShardConfig
    root: str
    files: dict[str, list[_File]]  # split -> files, in the order they join the interleave
    jobs: list[_ShardJob]
    dropped_tail_frames: int
    rejected: dict[str, str]
    duplicates: dict[str, str]
    resampled: list[str]
    truncated: dict[str, int]


def plan_shards(
    index_path: Path,
    out: Path,
    chunk_frames: int = 32768,
    shard_bytes: int | str = "256MB",
    seed: int = 0,
    val: float = 0.1,
    test: float | None = None,
    channels: str = "stereo",
    sample_rate: str | int | None = None,
    silence_db: float = -90.0,
    include: list[str] | None = None,
    group_by: str = "parent",
    interleave: int = 16,
    splits_from: Path | str | None = None,
) -> ShardPlan:
    """Check the inputs and decide every chunk's place from the index alone.

    `splits_from` (a manifest, or its folder) names the earlier set whose forced splits are kept;
    by default the set already in `out`, if any, so that a re-run plans what that run planned.
    """
    if chunk_frames <= 0:
        raise PipelineError(f"--chunk-frames {chunk_frames}: must be a positive number of frames")
    if not (0 <= val < 1 and (test is None or 0 <= test < 1) and val + (test or 0) < 1):
        raise PipelineError(f"--val {val} --test {test}: fractions in [0, 1) summing below 1")
    policy = ChannelPolicy.parse(channels)
    index = AudioIndex.load(index_path)
    selected = [
        rel for rel in index.files if not include or any(fnmatch.fnmatch(rel, g) for g in include)
    ]
    if not selected:
        raise PipelineError(f"{index_path}: no indexed file matches --include {include}")
    _check_unchanged(index, selected, index_path)
    rejected = {rel: r.reason for rel, r in index.rejected.items()}
    duplicates: dict[str, str] = {}
    first_by_digest: dict[str, str] = {}
    usable = []
    for rel in selected:
        entry = index.files[rel]
        try:
            policy.check(entry.channels)
        except AudioError as exc:
            rejected[rel] = str(exc)
            continue
        if entry.sha256 is not None:
            if entry.sha256 in first_by_digest:
                duplicates[rel] = first_by_digest[entry.sha256]
                continue
            first_by_digest[entry.sha256] = rel
        usable.append(rel)
    if not usable:
        raise PipelineError(f"{index_path}: no file is usable with --channels {policy}")
    rate = choose_sample_rate(index, usable, sample_rate)
    if test is None:
        test = default_test(usable)
    frames = {
        rel: resampled_frames(index.files[rel].frames, index.files[rel].sample_rate, rate)
        for rel in usable
    }
    earlier = out if splits_from is None else Path(splits_from)
    kept = recorded_splits(earlier, required=splits_from is not None)
    splits = decide_splits(
        {rel: n // chunk_frames for rel, n in frames.items()}, group_by, seed, val, test, kept
    )
    config = ShardConfig(
        index_sha256=file_sha256(index_path),
        chunk_frames=chunk_frames,
        sample_rate=rate,
        channels=str(policy),
        seed=seed,
        val=val,
        test=test,
        group_by=group_by,
        silence_db=silence_db,
        include=list(include or []),
        shard_bytes=parse_bytes(shard_bytes),
        window=interleave,  # the stored key keeps its name: old shard sets still load
        forced_splits=splits.forced,
    )
    files: dict[str, list[_File]] = {s: [] for s in SPLITS}
    for rel in usable:
        split, group = splits.of[rel]
        key = hashlib.sha256(rel.encode()).hexdigest()[:16]
        chunks = frames[rel] // chunk_frames
        files[split].append(_File(rel, index.files[rel], split, group, chunks, key))
    dropped = sum(n % chunk_frames for n in frames.values())
    if not any(f.chunks for f in files["train"]):
        raise PipelineError(
            f"{index_path}: the train split is empty (no file holds a whole chunk of "
            f"{chunk_frames} frames); lower --chunk-frames or add audio"
        )
    for split in ("val", "test"):
        if not any(f.chunks for f in files[split]):
            print(f"warning: the {split} split is empty", file=sys.stderr)
    per_shard = max(1, config.shard_bytes // (4 * chunk_frames + _SAMPLE_OVERHEAD))
    silence_peak = 32768 * 10 ** (silence_db / 20) if math.isfinite(silence_db) else 0.0
    jobs: list[_ShardJob] = []
    for split in SPLITS:
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(files[split]))
        files[split] = [files[split][i] for i in order]
        table = [(f.rel, f.entry.frames, f.entry.channels, f.key) for f in files[split]]
        plan = interleave_chunks(
            [f.chunks for f in files[split]],
            interleave,
            np.random.default_rng([seed, SPLITS.index(split), 1]),
        )
        for number, lo in enumerate(range(0, len(plan), per_shard)):
            rows = plan[lo : lo + per_shard]
            used = sorted(set(rows[:, 0].tolist()))
            local = {p: i for i, p in enumerate(used)}
            job = _ShardJob(
                root=index.root,
                out=str(out),
                path=f"{split}/{split}-{number:06d}.tar",
                split=split,
                channels=str(policy),
                sample_rate=rate,
                chunk_frames=chunk_frames,
                silence_peak=silence_peak,
                files=[table[p] for p in used],
                chunks=[(local[p], c) for p, c in rows.tolist()],
            )
            jobs.append(job)
    resampled = sorted(rel for rel in usable if index.files[rel].sample_rate != rate)
    truncated = {r: index.files[r].frames for r in usable if index.files[r].header_frames}
    return ShardPlan(
        config, index.root, files, jobs, dropped, rejected, duplicates, resampled, truncated
    )


def _check_unchanged(index: AudioIndex, files: list[str], index_path: Path) -> None:
    stale = []
    for rel in files:
        try:
            st = os.stat(os.path.join(index.root, split_stream_key(rel)[0]))
        except OSError:
            stale.append(f"{rel} (missing)")
            continue
        entry = index.files[rel]
        if (st.st_size, st.st_mtime_ns) != (entry.bytes, entry.mtime_ns):
            stale.append(f"{rel} (changed)")
    if stale:
        raise PipelineError(
            f"{index_path}: {len(stale)} indexed files are missing or changed since indexing "
            f"(first: {stale[0]}); re-run `python -m pipeline index {index.root}`"
        )


def _stamp_config(out: Path, config: ShardConfig) -> None:
    """A folder holds one shard set: the same config resumes it, another is refused."""
    stamp = out / CONFIG_STAMP
    if stamp.exists():
        existing = load_json(stamp, "shard config stamp")
        if existing != config.to_dict():
            diff = [
                k
                for k in sorted(existing.keys() | config.to_dict().keys())
                if existing.get(k) != config.to_dict().get(k)
            ]
            forced = existing.get("forced_splits")
            keep = f" (with --splits-from {out} to keep its forced splits)" if forced else ""
            raise PipelineError(
                f"{out}: holds a shard set made with another config (differs in: "
                f"{', '.join(diff)}); pass another --out{keep} or delete that folder"
            )
        return
    if out.exists() and any(out.glob("*/*.tar")):
        raise PipelineError(
            f"{out}: holds shards of unknown origin (no {CONFIG_STAMP}); pass another --out"
        )
    atomic_write_text(stamp, dumps(config.to_dict()))


def _journal(out: Path, job: _ShardJob) -> Path:
    return out / JOURNAL / (job.path.replace("/", "_") + ".json")


def _finished(out: Path, job: _ShardJob) -> ShardInfo | None:
    """The info of a shard a previous run completed, when its tar is still what it wrote."""
    journal = _journal(out, job)
    if not journal.exists():
        return None
    info = ShardInfo(**load_json(journal, "shard journal"))
    shard = out / job.path
    if shard.exists() and shard.stat().st_size == info.bytes:
        return info
    return None


def _remove_partial_shards(out: Path, jobs: list[_ShardJob]) -> None:
    """Delete the temporary files (`fsutil.atomic_path`: `.NAME.XXXX.tmp`) of these jobs' shards,
    and only theirs: other partitions of the set may be writing into the same folder."""
    for job in jobs:
        shard = out / job.path
        for tmp in shard.parent.glob(f".{shard.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _run_job(job: _ShardJob) -> ShardInfo:
    out = Path(job.out)
    done = _finished(out, job)
    if done is not None:
        return done
    info = _write_shard(job)
    atomic_write_text(_journal(out, job), dumps(vars(info)))
    return info


def write_shards(
    index_path: Path | str,
    out: Path | str | None = None,
    *,
    partition: str | None = None,
    jobs: int | None = None,
    progress: bool = True,
    **options,
) -> Manifest:
    """Write the shard set of an index to `out` (default: beside the index) and its manifest.

    Same inputs and options -> byte-identical shards and manifest, whatever `jobs` is. A re-run
    after an interruption keeps the shards that were finished. `options` are those of
    `plan_shards` (chunk_frames, shard_bytes, seed, val, test, channels, sample_rate, ...).
    """
    index_path = Path(index_path)
    out = Path(out) if out is not None else index_path.parent
    part = resolve_partition(partition)  # a job array's task when not given
    plan = plan_shards(index_path, out, **options)
    _stamp_config(out, plan.config)
    todo = [j for n, j in enumerate(plan.jobs) if part is None or n % part[1] == part[0]]
    workers = jobs or os.cpu_count() or 1
    _remove_partial_shards(out, todo)  # what a killed run of these jobs was writing
    try:
        infos = list(
            parallel_map(
                _run_job,
                todo,
                workers,
                "shard",
                progress,
                unit="s",
                weight=lambda j: j.seconds,
                min_items_for_pool=2,
            )
        )
    except BaseException:
        # the workers are gone now; one interrupted between creating its temporary file and
        # guarding it would have left it
        _remove_partial_shards(out, todo)
        raise
    shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    rejected = dict(plan.rejected)
    for job, info in zip(todo, infos, strict=True):
        shards[job.split].append(info)
        rejected.update(info.errors)
    manifest = Manifest(
        config=plan.config,
        root=plan.root,
        shards=shards,
        files={s: sum(1 for f in plan.files[s] if f.chunks) for s in SPLITS},
        tracks={s: len({f.group for f in plan.files[s] if f.chunks}) for s in SPLITS},
        dropped_tail_frames=plan.dropped_tail_frames,
        rejected=dict(sorted(rejected.items())),
        duplicates=plan.duplicates,
        resampled=plan.resampled,
        truncated=plan.truncated,
        partition=part,
    )
    name = "manifest.json" if part is None else f"manifest.part-{part[0]}-of-{part[1]}.json"
    manifest.save(out / name)
    return manifest
