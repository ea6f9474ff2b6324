"""index.json -> uint16 chunk tar shards + manifest.json (see docs/data.md, docs/formats.md).

Runs the plan of `pipeline/plan.py`: one tar per `ShardJob`, in worker processes, each
journaled when done so a re-run resumes; the manifest last.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.audio import ReaderPool
from pipeline.codec import int16_to_pcm16
from pipeline.errors import AudioError, PipelineError
from pipeline.jobarray import resolve_partition
from pipeline.parallel import parallel_map
from pipeline.plan import ShardJob, ShardPlan, plan_shards
from pipeline.records import (
    CONFIG_STAMP,
    SPLITS,
    ChunkMeta,
    Generation,
    Manifest,
    ShardConfig,
    ShardInfo,
    SourceRecord,
    dumps,
    refuse_appended,
)
from pipeline.storage import Location, open_location
from pipeline.tario import ShardWriter, npy_bytes

JOURNAL = ".done"  # one small JSON per finished shard, so a re-run resumes where it stopped


# tar header + npy header, and a 512-byte-padded json member with its header, per sample
def _write_shard(job: ShardJob) -> ShardInfo:
    """Read the planned chunks (random access, a few files open) and write one tar."""
    readers = ReaderPool(job.channels, job.sample_rate)
    errors: dict[str, str] = {}
    silent = failed = 0
    npy_header = npy_bytes(np.zeros((2, job.chunk_frames), np.uint16))[:128]
    staged = open_location(job.out).staged(job.path)
    with staged as target, ShardWriter(target) as writer:
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


def _stamp_config(out: Location, config: ShardConfig) -> None:
    """A folder holds one shard set: the same config resumes it, another is refused."""
    if out.exists(CONFIG_STAMP):
        existing = out.read_json(CONFIG_STAMP, "shard config stamp")
        diff = config.differences(existing)
        if diff:
            forced = existing.get("forced_splits")
            keep = f" (with --splits-from {out} to keep its forced splits)" if forced else ""
            grown = " or --append to add the new files to it," if diff == ["index_sha256"] else ""
            raise PipelineError(
                f"{out}: holds a shard set made with another config (differs in: "
                f"{', '.join(diff)}); pass another --out{keep},{grown} or delete that folder"
            )
        return
    if out.glob("*/*.tar"):
        raise PipelineError(
            f"{out}: holds shards of unknown origin (no {CONFIG_STAMP}); pass another --out"
        )
    out.put_text(CONFIG_STAMP, dumps(config.to_dict()))


def _journal(job: ShardJob) -> str:
    return f"{JOURNAL}/{job.path.replace('/', '_')}.json"


def _finished(out: Location, job: ShardJob) -> ShardInfo | None:
    """The info of a shard a previous run completed, when its tar is still what it wrote."""
    if not out.exists(_journal(job)):
        return None
    info = ShardInfo(**out.read_json(_journal(job), "shard journal"))
    return info if out.size(job.path) == info.bytes else None


def _remove_partial_shards(out: Location, jobs: list[ShardJob]) -> None:
    """Delete what a killed write of these jobs' shards left (temporary files, unfinished
    uploads), and only theirs: other partitions of the set may be writing there too."""
    for job in jobs:
        out.remove_partial(job.path)


def _run_job(job: ShardJob) -> ShardInfo:
    out = open_location(job.out)
    done = _finished(out, job)
    if done is not None:
        return done
    info = _write_shard(job)
    out.put_text(_journal(job), dumps(vars(info)))  # after the shard: it is complete
    return info


def run_jobs(
    out: Path | str, todo: list[ShardJob], jobs: int | None, progress: bool
) -> list[ShardInfo]:
    """Write the shards of `todo` into the folder or prefix `out` (those a previous run
    finished are kept), in parallel."""
    workers = jobs or os.cpu_count() or 1
    location = open_location(out)
    _remove_partial_shards(location, todo)  # what a killed run of these jobs was writing
    try:
        return list(
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
        _remove_partial_shards(location, todo)
        raise


def generation_of(plan: ShardPlan, shards: dict[str, list[ShardInfo]]) -> Generation:
    """The manifest's record of the write `plan` made, `shards` being what it wrote."""
    files = {
        f.rel: SourceRecord(f.entry.bytes, f.entry.mtime_ns, f.split, f.chunks, f.entry.sha256)
        for split in SPLITS
        for f in plan.files[split]
    }
    paths = {split: [s.path for s in infos] for split, infos in shards.items()}
    return Generation(plan.config.index_sha256, files, paths)


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
    out = open_location(out if out is not None else index_path.parent)
    part = resolve_partition(partition)  # a job array's task when not given
    refuse_appended(out.base, "a plain `shard` into it")
    plan = plan_shards(index_path, out.base, **options)
    _stamp_config(out, plan.config)
    todo = [j for n, j in enumerate(plan.jobs) if part is None or n % part[1] == part[0]]
    infos = run_jobs(out.base, todo, jobs, progress)
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
        generations=[generation_of(plan, shards)],
    )
    name = "manifest.json" if part is None else f"manifest.part-{part[0]}-of-{part[1]}.json"
    out.put_text(name, dumps(manifest.to_dict()))  # last: the set is whole once it is there
    return manifest
