"""Joining the manifests of `shard --partition I/N` parts (a job array) into one shard set."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.records import SPLITS, Manifest, ShardInfo, refuse_appended


def merge_manifests(folders: list[Path], out: Path | None = None) -> Manifest:
    """Join the manifests of `--partition` parts (in one or several folders) into one set."""
    out = Path(out) if out is not None else Path(folders[0])
    refuse_appended(out, "merging the parts of its first write again")
    parts: list[tuple[Path, Manifest]] = []
    for folder in folders:
        found = sorted(Path(folder).glob("manifest.part-*-of-*.json"))
        if not found:
            raise PipelineError(
                f"{folder}: no manifest.part-I-of-N.json here; run shard with --partition I/N first"
            )
        parts += [(p.parent, Manifest.load(p)) for p in found]
    first = parts[0][1]
    count = first.partition[1] if first.partition else 1
    seen = sorted(m.partition[0] for _, m in parts if m.partition)
    if seen != list(range(count)):
        missing = sorted(set(range(count)) - set(seen))
        raise PipelineError(
            f"merge: parts {missing} of {count} are missing (or a part is "
            "listed twice); run them before merging"
        )
    for folder, m in parts:
        if m.config != first.config or m.partition[1] != count:
            raise PipelineError(f"{folder}: this part was made with another config; re-run it")
    shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    rejected: dict[str, str] = {}
    for folder, m in parts:
        rel = os.path.relpath(folder, out)
        for split, infos in m.shards.items():
            for info in infos:
                path = info.path if rel == "." else f"{rel}/{info.path}"
                shards[split].append(ShardInfo(**{**vars(info), "path": path}))
        rejected.update(m.rejected)
    for split in shards:
        shards[split].sort(key=lambda s: Path(s.path).name)
    paths = {split: [s.path for s in infos] for split, infos in shards.items()}
    merged = Manifest(
        config=first.config,
        root=first.root,
        shards=shards,
        files=first.files,
        tracks=first.tracks,
        dropped_tail_frames=first.dropped_tail_frames,
        rejected=dict(sorted(rejected.items())),
        duplicates=first.duplicates,
        resampled=first.resampled,
        truncated=first.truncated,
        generations=[replace(first.generations[0], shards=paths)],  # parts are of a first write
    )
    merged.save(out / "manifest.json")
    return merged
