"""The records both stages share, and the one place that reads and writes them as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_text
from pipeline.storage import Options, exists, join, manifest_file, read_json

INDEX_FORMAT = "audio-index/1"


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, so equal records are equal bytes."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def load_json(path: Path | str, what: str) -> dict[str, Any]:
    """The JSON object at a path or `s3://` URL; a clear error when missing or not JSON."""
    return read_json(os.fspath(path), what)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a record, ignoring keys it does not know (written by a newer version)."""
    try:
        return cls(**data)
    except TypeError:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_OPTIONAL_ENTRY_FIELDS = (
    "sha256",
    "header_frames",
    "aliases",
    "streams",
    "stems",
    "stems_sum_db",
    "decoder",
)


@dataclass
class IndexEntry:
    """One readable audio file. `frames` is what really decodes, not what the header claims."""

    frames: int
    sample_rate: int
    channels: int
    subtype: str
    format: str
    bytes: int
    mtime_ns: int
    # Content fingerprint, computed only for files whose size another file shares: only those
    # can be exact duplicates, and hashing every file would read the whole corpus once more.
    sha256: str | None = None
    header_frames: int | None = None  # only when the header claims more than decodes
    aliases: list[str] = field(default_factory=list)  # other paths (symlinks) to the same file
    # A multi-stream MP4 (`.stem.mp4`): its audio stream count and their names, stream 0 first
    streams: int | None = None
    stems: list[str] = field(default_factory=list)
    stems_sum_db: float | None = None  # `index --stems sum`: mixture vs the stems' sum, in dB
    decoder: str | None = None  # PyAV's and libavcodec's versions, for files PyAV decodes

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        """Without the optional fields that are empty (``vars``, not ``asdict``: asdict deep-copies
        every field, which dominates writing a big index; docs/benchmarks.md)."""
        data = dict(vars(self))
        for optional in _OPTIONAL_ENTRY_FIELDS:
            if data[optional] is None or data[optional] == []:
                del data[optional]
        return data


@dataclass
class Rejection:
    """A file that is not usable, with the reason, and its stat so an unchanged one is skipped."""

    reason: str
    bytes: int = 0
    mtime_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class AudioIndex:
    """The lengths JSON: every accepted file by path relative to `root`, and every rejected one."""

    root: str
    files: dict[str, IndexEntry] = field(default_factory=dict)
    rejected: dict[str, Rejection] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "root": self.root,
            "files": {k: self.files[k].to_dict() for k in sorted(self.files)},
            "rejected": {k: self.rejected[k].to_dict() for k in sorted(self.rejected)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: Path | str = "index") -> AudioIndex:
        if data.get("format") != INDEX_FORMAT:
            raise PipelineError(
                f"{origin}: not an {INDEX_FORMAT} file (format={data.get('format')!r}); "
                "re-create it with `python -m pipeline index ROOT`"
            )
        return cls(
            root=data["root"],
            files={k: _from_dict(IndexEntry, v) for k, v in data["files"].items()},
            rejected={k: _from_dict(Rejection, v) for k, v in data.get("rejected", {}).items()},
        )

    @classmethod
    def load(cls, path: Path) -> AudioIndex:
        return cls.from_dict(load_json(path, "index"), path)

    def save(self, path: Path) -> None:
        """One line per file, sorted: the index diffs cleanly and writes at C speed."""
        encode = json.JSONEncoder(sort_keys=True).encode  # one encoder, not one per row
        lines = ["{"]
        for key, records in (("files", self.files), ("rejected", self.rejected)):
            rows = [f" {json.dumps(k)}: {encode(records[k].to_dict())}" for k in sorted(records)]
            lines += [f"{json.dumps(key)}: {{", ",\n".join(rows), "},"]
        lines.append(
            f'"format": {json.dumps(INDEX_FORMAT)},\n"root": {json.dumps(self.root)}\n}}\n'
        )
        atomic_write_text(path, "\n".join(lines))

    def lengths(self) -> dict[str, int]:
        """The original trainer's `{absolute path: frames}` map."""
        root = Path(self.root)
        return {str(root / rel): self.files[rel].frames for rel in sorted(self.files)}


MANIFEST_FORMAT = "audio-shards/1"
SPLITS = ("train", "val", "test")
CONFIG_STAMP = "shard-config.json"


@dataclass
class ChunkMeta:
    """The `KEY.json` member beside each `KEY.npy` chunk."""

    source: str  # path relative to the index root
    start: int  # first frame of the chunk in the source, at the shard set's sample rate
    sample_rate: int
    channels: int  # the source's original channel count
    split: str

    def to_json(self) -> bytes:
        return json.dumps(vars(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ChunkMeta:
        return cls(**json.loads(raw))


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str
    silent_chunks: int = 0  # planned chunks left out as digital silence
    failed_chunks: int = 0  # planned chunks left out because the source failed to decode
    errors: dict[str, str] = field(default_factory=dict)  # source path -> decode error


@dataclass
class ShardConfig:
    """Everything that determines the bytes of a shard set; a folder holds one config only."""

    index_sha256: str
    chunk_frames: int
    sample_rate: int
    channels: str
    seed: int
    val: float
    test: float
    group_by: str
    silence_db: float
    include: list[str]
    shard_bytes: int
    window: int
    # group -> split, for the groups whose hash draw did not place them: forced into a split the
    # draw left empty, by this run or an earlier one (`shard --splits-from`); see docs/data.md
    forced_splits: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Without `forced_splits` when none was forced: such a set's stamp is what it was."""
        data = dict(vars(self))
        if not data["forced_splits"]:
            del data["forced_splits"]
        return data

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """The keys in which a stored stamp differs from this config, sorted."""
        mine = self.to_dict()
        return sorted(k for k in stored.keys() | mine.keys() if stored.get(k) != mine.get(k))


@dataclass
class SourceRecord:
    """One usable file a generation planned, as the index described it then: a later append
    checks that the tree still holds it unchanged, and never forces its group into a split."""

    bytes: int
    mtime_ns: int
    split: str
    chunks: int  # whole chunks at the set's rate (0: planned, but nothing to cut)
    sha256: str | None = None  # only when the index fingerprinted it


@dataclass
class Generation:
    """One write of a shard set: the first `shard`, or one `shard --append`."""

    index_sha256: str  # the index it was planned from
    # path -> record of the files it added; None for a set made before generations were recorded
    files: dict[str, SourceRecord] | None
    shards: dict[str, list[str]]  # split -> the paths of its shards, in `Manifest.shards` order
    pruned: list[str] = field(default_factory=list)  # earlier files gone at this append

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        if self.files is not None:
            data["files"] = {k: vars(v) for k, v in sorted(self.files.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        files = data["files"]
        if files is not None:
            files = {k: SourceRecord(**v) for k, v in files.items()}
        return cls(**{**data, "files": files})


@dataclass
class Manifest:
    """What `shard` wrote: config, shards per split, and the totals of what was left out."""

    config: ShardConfig
    root: str  # the audio root the chunks' `source` paths are relative to
    shards: dict[str, list[ShardInfo]]  # split -> shards
    files: dict[str, int]  # split -> source files sharded
    tracks: dict[str, int]  # split -> groups (track folders)
    dropped_tail_frames: int
    rejected: dict[str, str]  # path -> reason (from the index, the channel policy, decoding)
    duplicates: dict[str, str]  # path -> the identical file that was sharded instead
    resampled: list[str]
    # files whose header claims more frames than decode: path -> frames read (verify needs it)
    truncated: dict[str, int] = field(default_factory=dict)
    partition: tuple[int, int] | None = None  # (i, n) for one part of a job array
    # the writes that made the set, first one first; `shards` lists every generation's shards
    generations: list[Generation] = field(default_factory=list)

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards.get(split, []))

    def seconds(self, split: str) -> float:
        return self.samples(split) * self.config.chunk_frames / self.config.sample_rate

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k not in ("config", "shards", "generations")}
        data["format"] = MANIFEST_FORMAT
        data["config"] = self.config.to_dict()
        data["shards"] = {k: [vars(s) for s in v] for k, v in self.shards.items()}
        data["generations"] = [g.to_dict() for g in self.generations]
        data["totals"] = {
            split: {"samples": self.samples(split), "seconds": self.seconds(split)}
            for split in self.shards
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: Path | str = "manifest") -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise PipelineError(
                f"{origin}: not an {MANIFEST_FORMAT} manifest; re-create it with "
                "`python -m pipeline shard INDEX`"
            )
        fields_ = {k: v for k, v in data.items() if k not in ("format", "totals")}
        fields_["config"] = ShardConfig(**data["config"])
        fields_["shards"] = {k: [ShardInfo(**s) for s in v] for k, v in data["shards"].items()}
        if "generations" in data:
            fields_["generations"] = [Generation.from_dict(g) for g in data["generations"]]
        else:  # written before generations: one, whose files were not recorded
            paths = {k: [s.path for s in v] for k, v in fields_["shards"].items()}
            fields_["generations"] = [Generation(data["config"]["index_sha256"], None, paths)]
        if fields_.get("partition") is not None:
            fields_["partition"] = tuple(fields_["partition"])
        return cls(**fields_)

    @classmethod
    def load(cls, path: Path | str, storage_options: Options = None) -> Manifest:
        """The manifest at a path or `s3://` URL: a manifest.json, or the folder or prefix
        that holds one."""
        location = manifest_file(os.fspath(path))
        return cls.from_dict(read_json(location, "shard manifest", storage_options), location)

    def save(self, path: Path) -> None:
        atomic_write_text(path, dumps(self.to_dict()))


def recorded_splits(path: Path | str, *, required: bool = True) -> dict[str, str]:
    """The forced splits of an earlier shard set, from its manifest, its config stamp, or their
    folder (the stamp, written before the first shard, serves a run stopped before its manifest).

    Without `required`, a folder that holds no shard set records none.
    """
    location = os.fspath(path)
    if manifest_file(location) != location:  # a folder or prefix: its manifest, else its stamp
        manifest = manifest_file(location)
        location = manifest if exists(manifest) else join(location, CONFIG_STAMP)
    if not required and not exists(location):
        return {}
    data = load_json(location, "shard manifest or config stamp")
    config = data.get("config", data)
    if "index_sha256" not in config:
        raise PipelineError(
            f"{location}: not a shard manifest or config stamp; pass a manifest.json"
        )
    forced = config.get("forced_splits", {})
    for group, split in forced.items():
        if split not in SPLITS:
            raise PipelineError(f"{location}: {group!r} is forced into {split!r}, not a split")
    return forced


def refuse_appended(out: Path | str, what: str) -> None:
    """A set grown by `shard --append` is written further only by `--append`: rewriting its
    manifest from its first generation's plan (`what`) would drop the later generations."""
    manifest = join(os.fspath(out), "manifest.json")
    if exists(manifest) and len(Manifest.load(manifest).generations) > 1:
        raise PipelineError(
            f"{out}: holds a shard set grown by `shard --append`; {what} would drop its later "
            "generations: use `shard --append`, or another --out"
        )
