"""The shard plan: which chunk of which file lands where in which shard, from the index alone.

It is computed before any audio is read (docs/data.md, "Shard it"), so shards are independent
jobs (`ShardJob`): `pipeline/shard.py` runs them in parallel, a `--partition i/n` part writes
every n-th one, and the bytes never depend on `--jobs`.
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

from pipeline.audio import ChannelPolicy, resampled_frames, split_stream_key
from pipeline.errors import AudioError, PipelineError
from pipeline.fsutil import file_sha256
from pipeline.records import (
    SPLITS,
    AudioIndex,
    IndexEntry,
    ShardConfig,
    recorded_splits,
)
from pipeline.splits import decide_splits, default_test, group_of

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
class PlannedFile:
    rel: str
    entry: IndexEntry
    split: str
    group: str
    chunks: int  # whole chunks at the shard rate
    key: str  # track hash, the first half of every sample key


@dataclass
class ShardJob:
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


@dataclass
class ShardPlan:
    config: ShardConfig
    root: str
    files: dict[str, list[PlannedFile]]  # split -> files, in the order they join the interleave
    jobs: list[ShardJob]
    dropped_tail_frames: int
    rejected: dict[str, str]
    duplicates: dict[str, str]
    resampled: list[str]
    truncated: dict[str, int]


@dataclass
class Selection:
    """The indexed files a set may take, and why the others are left out."""

    index: AudioIndex
    policy: ChannelPolicy
    usable: list[str]  # in index order, `first` ones first
    rejected: dict[str, str]
    duplicates: dict[str, str]  # path -> the identical usable file


def select_files(
    index_path: Path, include: list[str] | None, channels: str, first: frozenset[str] = frozenset()
) -> Selection:
    """The files `--include` selects that the channel policy accepts, one of each duplicate
    (same sha256): the earliest in index order, files in `first` before all others."""
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
    for rel in sorted(selected, key=lambda rel: rel not in first):
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
    return Selection(index, policy, usable, rejected, duplicates)


@dataclass(frozen=True)
class ShardOptions:
    """The `shard` options that shape a set's bytes, with their defaults (`plan_shards` and
    `pipeline/append.py:plan_append` take the same ones)."""

    chunk_frames: int = 32768
    shard_bytes: int | str = "256MB"
    seed: int = 0
    val: float = 0.1
    test: float | None = None
    channels: str = "stereo"
    sample_rate: str | int | None = None
    silence_db: float = -90.0
    include: list[str] | None = None
    group_by: str = "parent"
    interleave: int = 16


def plan_shards(
    index_path: Path,
    out: Path | str,
    splits_from: Path | str | None = None,
    **options,
) -> ShardPlan:
    """Check the inputs and decide every chunk's place from the index alone.

    `splits_from` (a manifest, or its folder) names the earlier set whose forced splits are kept;
    by default the set already in `out`, if any, so that a re-run plans what that run planned.
    """
    o = ShardOptions(**options)  # a wrong name is a TypeError naming it
    if o.chunk_frames <= 0:
        raise PipelineError(f"--chunk-frames {o.chunk_frames}: must be a positive number of frames")
    if not (0 <= o.val < 1 and (o.test is None or 0 <= o.test < 1) and o.val + (o.test or 0) < 1):
        raise PipelineError(f"--val {o.val} --test {o.test}: fractions in [0, 1) summing below 1")
    chosen = select_files(index_path, o.include, o.channels)
    index, usable = chosen.index, chosen.usable
    rate = choose_sample_rate(index, usable, o.sample_rate)
    test = default_test(usable) if o.test is None else o.test
    frames = frames_at(index, usable, rate)
    earlier = out if splits_from is None else splits_from
    kept = recorded_splits(earlier, required=splits_from is not None)
    splits = decide_splits(
        {rel: n // o.chunk_frames for rel, n in frames.items()},
        o.group_by,
        o.seed,
        o.val,
        test,
        kept,
    )
    config = ShardConfig(
        index_sha256=file_sha256(index_path),
        chunk_frames=o.chunk_frames,
        sample_rate=rate,
        channels=str(chosen.policy),
        seed=o.seed,
        val=o.val,
        test=test,
        group_by=o.group_by,
        silence_db=o.silence_db,
        include=list(o.include or []),
        shard_bytes=parse_bytes(o.shard_bytes),
        window=o.interleave,  # the stored key keeps its name: old shard sets still load
        forced_splits=splits.forced,
    )
    files = source_files(index, usable, {rel: splits.of[rel][0] for rel in usable}, frames, config)
    if not any(f.chunks for f in files["train"]):
        raise PipelineError(
            f"{index_path}: the train split is empty (no file holds a whole chunk of "
            f"{o.chunk_frames} frames); lower --chunk-frames or add audio"
        )
    for split in ("val", "test"):
        if not any(f.chunks for f in files[split]):
            print(f"warning: the {split} split is empty", file=sys.stderr)
    return finish_plan(config, chosen, files, frames, out, generation=0)


def frames_at(index: AudioIndex, rels: list[str], rate: int) -> dict[str, int]:
    """Each file's frame count once resampled to `rate`."""
    return {
        rel: resampled_frames(index.files[rel].frames, index.files[rel].sample_rate, rate)
        for rel in rels
    }


def source_files(
    index: AudioIndex,
    rels: list[str],
    split_of: dict[str, str],
    frames: dict[str, int],
    config: ShardConfig,
) -> dict[str, list[PlannedFile]]:
    """`rels` per split, in the given order, with their whole chunks and sample-key hash."""
    files: dict[str, list[PlannedFile]] = {s: [] for s in SPLITS}
    for rel in rels:
        split = split_of[rel]
        key = hashlib.sha256(rel.encode()).hexdigest()[:16]
        chunks = frames[rel] // config.chunk_frames
        group = group_of(rel, config.group_by)
        files[split].append(PlannedFile(rel, index.files[rel], split, group, chunks, key))
    return files


def finish_plan(
    config: ShardConfig,
    chosen: Selection,
    files: dict[str, list[PlannedFile]],
    frames: dict[str, int],
    out: Path | str,
    generation: int,
) -> ShardPlan:
    """Order and interleave `files` (seeded per split and generation) and cut them into shard
    jobs named for the generation; generation 0's names and seeds are the first write's."""
    index, rate, chunk_frames = chosen.index, config.sample_rate, config.chunk_frames
    per_shard = max(1, config.shard_bytes // (4 * chunk_frames + _SAMPLE_OVERHEAD))
    silence_db = config.silence_db
    silence_peak = 32768 * 10 ** (silence_db / 20) if math.isfinite(silence_db) else 0.0
    tag = f"g{generation:03d}-" if generation else ""
    jobs: list[ShardJob] = []
    for split in SPLITS:
        seeds = [config.seed, SPLITS.index(split)] + ([0, generation] if generation else [])
        order = np.random.default_rng(seeds).permutation(len(files[split]))
        files[split] = [files[split][i] for i in order]
        table = [(f.rel, f.entry.frames, f.entry.channels, f.key) for f in files[split]]
        plan = interleave_chunks(
            [f.chunks for f in files[split]], config.window, np.random.default_rng([*seeds, 1])
        )
        for number, lo in enumerate(range(0, len(plan), per_shard)):
            rows = plan[lo : lo + per_shard]
            used = sorted(set(rows[:, 0].tolist()))
            local = {p: i for i, p in enumerate(used)}
            job = ShardJob(
                root=index.root,
                out=str(out),
                path=f"{split}/{split}-{tag}{number:06d}.tar",
                split=split,
                channels=config.channels,
                sample_rate=rate,
                chunk_frames=chunk_frames,
                silence_peak=silence_peak,
                files=[table[p] for p in used],
                chunks=[(local[p], c) for p, c in rows.tolist()],
            )
            jobs.append(job)
    planned = [f for split in SPLITS for f in files[split]]
    dropped = sum(frames[f.rel] % chunk_frames for f in planned)
    resampled = sorted(f.rel for f in planned if f.entry.sample_rate != rate)
    truncated = {f.rel: f.entry.frames for f in planned if f.entry.header_frames}
    return ShardPlan(
        config,
        index.root,
        files,
        jobs,
        dropped,
        chosen.rejected,
        chosen.duplicates,
        resampled,
        truncated,
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
