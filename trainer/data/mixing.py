"""Weighted mixing of shard sets: one epoch's V interleaved from the sets' own group sequences.

`ShardDataModule(manifest=[{path: A, weight: 3}, {path: B, weight: 1}])` trains on both sets.
Each set runs its own elastic epoch (trainer/data/epoch.py: a seeded permutation of its shards
per cycle, cut into shuffle groups, cycle after cycle), so a small set with a large weight
repeats, with a fresh permutation each cycle. The mixed V takes whole shuffle groups from the
sets, so a loader stream still reads one group of one set at a time: the next group goes to the
set furthest behind its share of windows (its windows so far, plus a seeded fraction of its next
group, over its weight; ties to the first set). Every prefix of V is then within about one group
of the weights, which independent random draws are not. V is a pure function of (seed, epoch),
the sets' counts and the weights, so resume and elastic layouts work over it unchanged.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.records import Manifest
from trainer.data.batch import DataError
from trainer.data.epoch import GroupKey, ShuffleGroup, Windows
from trainer.data.shards import Chunk

__all__ = ["ALIKE", "MixedWindows", "ShardSet", "load_sets"]

# What sets must share to be mixed: windows cut alike, played at one rate. Every set of the
# manifest format stores uint16 samples (`Manifest.from_dict` refuses any other format).
ALIKE = ("chunk_frames", "sample_rate", "channels")
ENTRY_KEYS = ("path", "weight", "url_prefix")


@dataclass(frozen=True)
class ShardSet:
    """One set of a mixture: its manifest (where it is, what it says), where its shards are,
    its weight and a short name unique in the mixture (for per-set metrics)."""

    location: str
    manifest: Manifest
    url_prefix: str
    weight: float
    name: str

    @property
    def folder(self) -> str:
        return storage.parent(self.location)


def _entries(manifest: str | Sequence[Any], url_prefix: str | None) -> list[dict[str, Any]]:
    """The `{path, weight, url_prefix}` of each set; a str is one set of weight 1."""
    if isinstance(manifest, str | os.PathLike):
        return [{"path": str(manifest), "weight": 1.0, "url_prefix": url_prefix}]
    if not manifest:
        raise DataError("manifest []: name at least one shard set")
    if url_prefix is not None and len(manifest) > 1:
        raise DataError(
            f"url_prefix {url_prefix!r} with {len(manifest)} shard sets: give each set its own "
            "in its manifest entry ({path: ..., url_prefix: ...})"
        )
    entries = []
    for entry in manifest:
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - set(ENTRY_KEYS):
            raise DataError(
                f"manifest entry {entry!r}: use {{path: SET, weight: W}} (keys: "
                f"{', '.join(ENTRY_KEYS)})"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise DataError(f"manifest entry {entry!r}: weight must be a number > 0")
        prefix = entry.get("url_prefix", url_prefix)
        entries.append({"path": str(entry["path"]), "weight": float(weight), "url_prefix": prefix})
    return entries


def _name(folder: str) -> str:
    """A set's short name: its folder's last part."""
    if not storage.is_url(folder):
        folder = os.path.abspath(folder)
    return folder.rstrip("/").rsplit("/", 1)[-1]


def _check_alike(sets: list[ShardSet]) -> None:
    """One line naming the first set and the first that differs from it, and in what."""
    first = sets[0]
    for other in sets[1:]:
        for key in ALIKE:
            mine, theirs = getattr(first.manifest.config, key), getattr(other.manifest.config, key)
            if mine != theirs:
                raise DataError(
                    f"shard sets {first.folder} and {other.folder} differ in {key} ({mine} vs "
                    f"{theirs}); mix only sets sharded alike"
                )


def load_sets(
    manifest: str | Sequence[Any], url_prefix: str | None, options: dict[str, Any]
) -> list[ShardSet]:
    """The sets a datamodule's `manifest` names (one path or URL, or a list of entries), their
    manifests read (fsspec `options` for `s3://`), checked to be sharded alike."""
    sets: list[ShardSet] = []
    taken: set[str] = set()
    for entry in _entries(manifest, url_prefix):
        location = storage.manifest_file(entry["path"])
        data = storage.read_json(location, "shard manifest", options)
        folder = storage.parent(location)
        name, copy = _name(folder), 1
        while name in taken:
            copy += 1
            name = f"{_name(folder)}-{copy}"
        taken.add(name)
        sets.append(
            ShardSet(
                location,
                Manifest.from_dict(data, location),
                entry["url_prefix"] or folder,
                entry["weight"],
                name,
            )
        )
    _check_alike(sets)
    return sets


class MixedWindows:
    """V of a mixture: whole shuffle groups of the sets' own `Windows`, interleaved by weight.
    A group's key is (set, cycle, group) of that set's epoch; see the module docstring."""

    def __init__(self, sets: list[Windows], weights: Sequence[float], seed: int, epoch: int):
        self.sets, self.weights = sets, [float(w) for w in weights]
        self._phases = np.random.default_rng([seed, epoch, 0, 2]).random(len(sets)).tolist()
        self._taken = [0] * len(sets)  # groups of each set in V so far
        self._windows = [0] * len(sets)  # their windows
        self._keys: list[GroupKey] = []  # slot -> (set, cycle, group)
        self._ends: list[int] = []  # slot -> cumulative windows of V at its end

    def _next_size(self, source: int) -> int:
        """Windows of the next group of set `source` (its groups, cycle after cycle)."""
        windows = self.sets[source]
        cycle, number = divmod(self._taken[source], windows.groups_per_cycle)
        ends = windows.group_ends(cycle)
        return int(ends[number] - (ends[number - 1] if number else 0))

    def _extend(self) -> None:
        """Give the next slot of V to the set furthest behind its share of windows."""
        sizes = [self._next_size(s) for s in range(len(self.sets))]
        due = [
            (self._windows[s] + self._phases[s] * sizes[s]) / self.weights[s]
            for s in range(len(self.sets))
        ]
        source = int(np.argmin(due))  # ties: the first set
        cycle, number = divmod(self._taken[source], self.sets[source].groups_per_cycle)
        self._keys.append((source, cycle, number))
        self._ends.append((self._ends[-1] if self._ends else 0) + sizes[source])
        self._taken[source] += 1
        self._windows[source] += sizes[source]

    def locate(self, window: int) -> tuple[GroupKey, int]:
        """((set, cycle, group), index in the group's permuted order) of window `window`."""
        while not self._ends or self._ends[-1] <= window:
            self._extend()
        slot = bisect.bisect_right(self._ends, window)
        return self._keys[slot], window - (self._ends[slot - 1] if slot else 0)

    def load(
        self, key: GroupKey, want_meta: bool, skipped: list[tuple[str, str]]
    ) -> tuple[ShuffleGroup, list[Chunk | None]]:
        """Group `key` (from `locate`) and its chunks, read from its set's shards."""
        source, cycle, number = key
        return self.sets[source].load((cycle, number), want_meta, skipped)
