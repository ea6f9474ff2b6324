"""`shard --append`: the new files of a re-indexed, grown tree become a new generation of shards.

The shards of earlier generations are never rewritten, so a set that is already copied,
uploaded or being trained on keeps every byte; the manifest lists all generations' shards, and
records each generation's files so that the next append knows what is new and what changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.audio import ChannelPolicy
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_text, file_sha256
from pipeline.jobarray import resolve_partition
from pipeline.plan import (
    ShardOptions,
    ShardPlan,
    finish_plan,
    frames_at,
    parse_bytes,
    select_files,
    source_files,
)
from pipeline.records import (
    SPLITS,
    AudioIndex,
    Manifest,
    ShardConfig,
    ShardInfo,
    SourceRecord,
    dumps,
    load_json,
)
from pipeline.shard import generation_of, run_jobs
from pipeline.splits import decide_splits, group_of
from pipeline.storage import is_url

# the config keys an append must share with the set, and the `shard` options that set them
SHARED_OPTIONS = {
    "chunk_frames": "--chunk-frames",
    "sample_rate": "--sample-rate",
    "channels": "--channels",
    "seed": "--seed",
    "val": "--val",
    "test": "--test",
    "group_by": "--group-by",
    "silence_db": "--silence-db",
    "include": "--include",
    "shard_bytes": "--shard-bytes",
    "window": "--interleave",
}


def generation_stamp(number: int) -> str:
    """The config stamp of generation `number` >= 1 (generation 0's is `shard-config.json`)."""
    return f"shard-config-g{number:03d}.json"


@dataclass
class AppendPlan:
    earlier: Manifest  # the set as it stands
    plan: ShardPlan  # the new generation: its files and shard jobs only
    pruned: list[str]  # earlier generations' files the tree no longer holds (`--prune`)

    @property
    def number(self) -> int:
        return len(self.earlier.generations)


def _earlier_set(out: Path) -> Manifest:
    manifest = out / "manifest.json"
    if not manifest.exists():
        parts = " (its parts are not merged: run `python -m pipeline merge` first)"
        raise PipelineError(
            f"{out}: holds no shard set to append to"
            + (parts if any(out.glob("manifest.part-*-of-*.json")) else "")
            + "; run `python -m pipeline shard INDEX --out DIR` without --append first"
        )
    earlier = Manifest.load(manifest)
    if any(g.files is None for g in earlier.generations):
        raise PipelineError(
            f"{manifest}: written before shard sets recorded their files, so an append cannot "
            f"tell new files from old; shard the grown tree into a new folder with --splits-from "
            f"{out}"
        )
    return earlier


def _check_options(out: Path, config: ShardConfig, given: dict[str, object]) -> None:
    """Every option that shapes shards must be the set's (`sample_rate` and `test` not given:
    the set's)."""
    differ = [
        f"{SHARED_OPTIONS[key]} (the set has {getattr(config, key)!r}, given {value!r})"
        for key, value in given.items()
        if value is not None and value != getattr(config, key)
    ]
    if differ:
        raise PipelineError(
            f"{out}: --append takes the set's options, and these differ: {'; '.join(differ)}; "
            "pass the set's values (see its manifest's config)"
        )


def _pruned(out: Path, earlier: Manifest, index: AudioIndex, prune: bool) -> list[str]:
    """The earlier files gone from the tree (allowed with `prune`); a changed one is an error."""
    gone_before = {rel for g in earlier.generations for rel in g.pruned}
    changed, gone = [], []
    for g in earlier.generations:
        for rel, record in (g.files or {}).items():
            if rel in gone_before:
                continue
            entry = index.files.get(rel)
            if entry is None and rel in index.rejected:
                changed.append(f"{rel} (now rejected: {index.rejected[rel].reason})")
            elif entry is None:
                gone.append(rel)
            elif (entry.bytes, entry.mtime_ns) != (record.bytes, record.mtime_ns) or (
                None not in (entry.sha256, record.sha256) and entry.sha256 != record.sha256
            ):
                changed.append(f"{rel} (size, mtime or sha256 differ)")
    if changed:
        raise PipelineError(
            f"{out}: {len(changed)} files it sharded changed since (first: {changed[0]}); "
            f"restore them, or shard the tree into a new folder with --splits-from {out}"
        )
    if gone and not prune:
        raise PipelineError(
            f"{out}: {len(gone)} files it sharded are gone from the tree (first: {gone[0]}); "
            "restore them, or pass --prune to record them as gone (their chunks stay in the set)"
        )
    return sorted(gone)


def plan_append(
    index_path: Path,
    out: Path,
    *,
    prune: bool = False,
    **options,
) -> AppendPlan | None:
    """The next generation of the set in `out`: the usable files of the index that no earlier
    generation holds, split as the set splits (earlier groups stay where they are); None when
    there is nothing new and nothing to prune."""
    o = ShardOptions(**options)  # a wrong name is a TypeError naming it
    earlier = _earlier_set(out)
    config = earlier.config
    rate = None if o.sample_rate in (None, "native", "auto") else int(o.sample_rate)
    given = dict(
        chunk_frames=o.chunk_frames,
        sample_rate=rate,
        channels=str(ChannelPolicy.parse(o.channels)),
        seed=o.seed,
        val=o.val,
        test=o.test,
        group_by=o.group_by,
        silence_db=o.silence_db,
        include=list(o.include or []),
        shard_bytes=parse_bytes(o.shard_bytes),
        window=o.interleave,
    )
    _check_options(out, config, given)
    recorded: dict[str, SourceRecord] = {}
    for g in earlier.generations:
        recorded.update(g.files or {})
    chosen = select_files(index_path, config.include, config.channels, frozenset(recorded))
    index = chosen.index
    if index.root != earlier.root:
        raise PipelineError(
            f"{index_path}: indexes {index.root}, the set in {out} holds {earlier.root}; "
            "pass the index of the set's tree"
        )
    pruned = _pruned(out, earlier, index, prune)
    new = [rel for rel in chosen.usable if rel not in recorded]
    if not new and not pruned:
        return None
    frames = frames_at(index, new, config.sample_rate)
    chunks = {rel: frames[rel] // config.chunk_frames for rel in new}
    split_of, forced = _split_new(chunks, recorded, config)
    grown = replace(config, index_sha256=file_sha256(index_path), forced_splits=forced)
    files = source_files(index, new, split_of, frames, grown)
    number = len(earlier.generations)
    return AppendPlan(earlier, finish_plan(grown, chosen, files, frames, out, number), pruned)


def _split_new(
    chunks: dict[str, int], recorded: dict[str, SourceRecord], config: ShardConfig
) -> tuple[dict[str, str], dict[str, str]]:
    """The split of each new file (`chunks`: its whole chunks), and the set's forced splits.

    `decide_splits` over the earlier files and the new ones, with the set's forced splits kept:
    a group's draw never changes, so a new file of an earlier group joins that group's split, a
    forced one included. Earlier train groups enter it with no chunks, so no forced split can
    take one of them (their chunks are in train shards already); earlier val and test groups
    keep theirs, so a split they fill is not forced again.
    """
    old_train = {group_of(r, config.group_by) for r, c in recorded.items() if c.split == "train"}
    seen = {rel: rec.chunks for rel, rec in recorded.items()} | chunks
    splits = decide_splits(
        {r: 0 if group_of(r, config.group_by) in old_train else n for r, n in seen.items()},
        config.group_by,
        config.seed,
        config.val,
        config.test,
        config.forced_splits,
    )
    split_of = {rel: splits.of[rel][0] for rel in chunks}
    return split_of, {**config.forced_splits, **splits.forced}


def _stamp_generation(out: Path, number: int, config: ShardConfig) -> None:
    """Like the first write's stamp: the same append resumes, another one is refused."""
    stamp = out / generation_stamp(number)
    if stamp.exists():
        diff = config.differences(load_json(stamp, "shard config stamp"))
        if diff:
            raise PipelineError(
                f"{stamp}: an append planned with another index or config stopped here (differs "
                f"in: {', '.join(diff)}); re-run it as it was, or delete {stamp.name} and the "
                f"*-g{number:03d}-*.tar shards"
            )
        return
    atomic_write_text(stamp, dumps(config.to_dict()))


def append_shards(
    index_path: Path | str,
    out: Path | str | None = None,
    *,
    prune: bool = False,
    partition: str | None = None,
    jobs: int | None = None,
    progress: bool = True,
    **options,
) -> Manifest | None:
    """Add the index's new files to the set in `out` (default: beside the index) as a new
    generation, and rewrite its manifest; None when there was nothing to add (nothing written).

    Same set, index and options -> byte-identical new shards, whatever `jobs` is; a re-run after
    an interruption keeps the shards that were finished. `options` are `plan_append`'s.
    """
    if out is not None and is_url(os.fspath(out)):
        raise PipelineError(
            f"{out}: shard --append writes local folders only; append into a local copy of the "
            "set and upload it, the manifest last"
        )
    index_path = Path(index_path)
    out = Path(out) if out is not None else index_path.parent
    if resolve_partition(partition) is not None:
        raise PipelineError(
            "--append writes one generation in one process; pass --partition none (or run it "
            "outside the job array)"
        )
    grow = plan_append(index_path, out, prune=prune, **options)
    if grow is None:
        return None
    plan, earlier = grow.plan, grow.earlier
    _stamp_generation(out, grow.number, plan.config)
    infos = run_jobs(out, plan.jobs, jobs, progress)
    added: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    for job, info in zip(plan.jobs, infos, strict=True):
        added[job.split].append(info)
    generation = replace(generation_of(plan, added), pruned=grow.pruned)
    generations = [*earlier.generations, generation]
    shards = {s: earlier.shards.get(s, []) + added[s] for s in SPLITS}
    records = [(rel, rec) for g in generations for rel, rec in (g.files or {}).items()]
    held = {s: [rel for rel, rec in records if rec.chunks and rec.split == s] for s in SPLITS}
    rejected = dict(plan.rejected)
    for info in (info for infos in shards.values() for info in infos):
        rejected.update(info.errors)
    manifest = Manifest(
        config=plan.config,
        root=plan.root,
        shards=shards,
        files={s: len(held[s]) for s in SPLITS},
        tracks={s: len({group_of(rel, plan.config.group_by) for rel in held[s]}) for s in SPLITS},
        dropped_tail_frames=earlier.dropped_tail_frames + plan.dropped_tail_frames,
        rejected=dict(sorted(rejected.items())),
        duplicates=plan.duplicates,
        resampled=sorted(set(earlier.resampled) | set(plan.resampled)),
        truncated={**earlier.truncated, **plan.truncated},
        generations=generations,
    )
    manifest.save(out / "manifest.json")
    return manifest
