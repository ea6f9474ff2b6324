"""The train epoch as arithmetic: one order of windows for any number of ranks and workers.

An epoch is a pure function of (seed, epoch) and the manifest's counts. Cycle c is a seeded
permutation of the split's shards, each once, their chunks in order, cut into shuffle groups of
`group_chunks` chunks whose windows are permuted (`shuffle_group`). The windows of the groups,
cycle after cycle, form one sequence V, and the epoch is its first `steps x global_batch`
windows. A layout (ranks x virtual streams per rank, per-rank batch, pack) cuts its sequence
into runs of about one group: round q gives run q*S + s to stream s, so a stream reads its own
groups; the epoch's last, partial round is tiled so that every layout consumes exactly the
epoch's windows. Resumed under another layout, the windows the old one had consumed are known
from the global step alone, and the new layout runs over what is left: every window of the
epoch is consumed exactly once across any number of such changes (docs/data.md). Mixed shard
sets interleave their own V's groups into one (trainer/data/mixing.py).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from trainer.data.batch import DIRECTIONS
from trainer.data.shards import Chunk, ShardSplit

__all__ = [
    "SHIFTED_CHUNKS",
    "GroupKey",
    "Layout",
    "Segment",
    "ShuffleGroup",
    "Windows",
    "consumed_after",
    "positions_to_windows",
    "shuffle_group",
    "stream_position",
]

SHIFTED_CHUNKS = 0.25  # train chunks whose windows start anywhere in [0, L), see shuffle_group


@dataclass
class ShuffleGroup:
    """The windows of `group_chunks` consecutive stream chunks, in their permuted order."""

    offsets: np.ndarray  # [chunks] first window start in each chunk
    counts: np.ndarray  # [chunks] windows in each chunk
    order: np.ndarray  # [windows] -> index into the group's windows (chunk-major)
    directions: np.ndarray  # [windows] in output order
    seeds: np.ndarray  # [windows] in output order: each window's own RNG seed (tasks)


def shuffle_group(
    rng: np.random.Generator,
    chunks: int,
    frames: int,
    length: int,
    windows_per_chunk: int | None,
    direction: str,
) -> ShuffleGroup:
    """The windows of `chunks` consecutive chunks of `frames` frames, cut at `length`, and
    their permutation, directions and seeds, all drawn from `rng`."""
    n = chunks
    if windows_per_chunk:
        counts = np.full(n, windows_per_chunk)
        offsets = rng.integers(0, frames - counts * length, endpoint=True)
    else:
        # All windows the chunk holds from a random start. A start past the slack C mod L
        # costs a window (1/4 of L = 8192 in a 32768 chunk), so only a quarter of the
        # chunks are shifted that far: window boundaries still move between epochs, and
        # ~97% of what is read is delivered.
        slack = frames - (frames // length) * length
        shifted = rng.random(n) < SHIFTED_CHUNKS
        offsets = np.where(
            shifted,
            rng.integers(0, min(length, frames - length + 1), size=n),
            rng.integers(0, slack, size=n, endpoint=True),
        )
        counts = (frames - offsets) // length
    order = rng.permutation(int(counts.sum()))
    if direction == "random":
        directions = rng.integers(0, 2, size=len(order))
    else:
        directions = np.full(len(order), DIRECTIONS[direction])
    seeds = rng.integers(0, 2**63, size=len(order))
    return ShuffleGroup(offsets, counts, order, directions, seeds)


Intervals = list[tuple[int, int]]  # [start, end) ranges of V, in order; the last one endless


@dataclass(frozen=True)
class Layout:
    """How a run splits the work: ranks, virtual streams per rank (the loader's workers, at
    least 1), per-rank batch, batches per pack, and batches per stream in one round."""

    ranks: int
    streams: int
    batch: int
    pack: int
    run_batches: int

    @property
    def total_streams(self) -> int:
        return self.ranks * self.streams

    @property
    def run(self) -> int:
        """Windows of one stream's run."""
        return self.batch * self.run_batches


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch under one layout, from global step `start`, over `sequence` (the
    windows of V still to consume, in order, as intervals)."""

    start: int
    layout: Layout
    sequence: tuple[tuple[int, int], ...]

    @classmethod
    def fresh(cls, layout: Layout) -> Segment:
        """A whole epoch from step 0 under `layout`."""
        return cls(0, layout, ((0, -1),))

    def to_dict(self) -> dict:
        return {"start": self.start, "layout": vars(self.layout), "sequence": self.sequence}

    @classmethod
    def from_dict(cls, data: dict) -> Segment:
        layout = Layout(**data["layout"])
        return cls(int(data["start"]), layout, tuple(tuple(x) for x in data["sequence"]))


def _stream_batches(layout: Layout, steps: int, stream: int) -> int:
    """Batches of virtual stream `stream` (of one rank) among a rank's first `steps` steps:
    pack q (of `pack` batches) comes from stream q % streams."""
    packs, rest = divmod(steps, layout.pack)
    whole = packs // layout.streams + (stream < packs % layout.streams)
    return whole * layout.pack + (rest if packs % layout.streams == stream else 0)


def stream_position(layout: Layout, steps: int, stream: int, batch: int) -> int:
    """Where batch `batch` of global stream `stream` (rank * streams + virtual stream) starts in
    the segment's sequence, for a segment of `steps` global steps."""
    per_round = layout.run_batches * layout.streams  # steps of one round (whole packs)
    rounds = steps // per_round
    round_number, inside = divmod(batch, layout.run_batches)
    if round_number < rounds:
        return (round_number * layout.total_streams + stream) * layout.run + inside * layout.batch
    # the last, partial round: contiguous pieces, one per stream, sized by its batches there
    rest = steps - rounds * per_round
    base = rounds * layout.total_streams * layout.run
    counts = [_stream_batches(layout, rest, v) for v in range(layout.streams)]
    rank, virtual = divmod(stream, layout.streams)
    before = rank * sum(counts) + sum(counts[:virtual])
    return base + (before + batch - rounds * layout.run_batches) * layout.batch


def consumed_after(segment: Segment, steps: int, done: int) -> tuple[tuple[int, int], ...]:
    """The sequence still to consume (as V intervals) once `done` of the segment's `steps`
    steps have been taken: the runs' unconsumed parts, then the rest of the sequence."""
    layout = segment.layout
    taken: Intervals = []
    for stream in range(layout.total_streams):
        count = _stream_batches(layout, done, stream % layout.streams)
        for batch in range(count):
            at = stream_position(layout, steps, stream, batch)
            if taken and taken[-1][1] == at:
                taken[-1] = (taken[-1][0], at + layout.batch)
            else:
                taken.append((at, at + layout.batch))
    taken.sort()
    left: Intervals = []
    position = 0
    for start, end in taken:
        if start > position:
            left.append((position, start))
        position = max(position, end)
    left.append((position, -1))  # -1: endless
    return tuple(_compose(segment.sequence, left))


def _compose(outer: tuple[tuple[int, int], ...], inner: Intervals) -> Intervals:
    """`inner` (ranges of positions in `outer`'s sequence) as ranges of V."""
    starts, offsets, total = [], [], 0
    for start, end in outer:
        starts.append(total)
        offsets.append(start)
        total += (end - start) if end >= 0 else 1 << 62
    out: Intervals = []
    for lo, hi in inner:
        hi = hi if hi >= 0 else 1 << 62
        while lo < hi:
            k = bisect.bisect_right(starts, lo) - 1
            span_end = starts[k + 1] if k + 1 < len(starts) else 1 << 62
            end = min(hi, span_end)
            v_start = offsets[k] + lo - starts[k]
            endless = end >= 1 << 62
            out.append((v_start, -1 if endless else v_start + end - lo))
            if endless:
                return out
            lo = end
    return out


def positions_to_windows(
    sequence: tuple[tuple[int, int], ...], start: int, count: int
) -> list[int]:
    """Window numbers (in V) of positions [start, start + count) of `sequence`."""
    return [v for lo, hi in _compose(sequence, [(start, start + count)]) for v in range(lo, hi)]


GroupKey = tuple[int, ...]  # a shuffle group of V, opaque to its reader (locate -> load)


class Windows:
    """The windows of V over one shard set: which chunk (by cycle and chunk number) each comes
    from, where it starts in it, and its direction and seed. `source` numbers the set in a
    mixture (trainer/data/mixing.py); set 0 draws exactly what a set alone draws."""

    def __init__(
        self,
        split: ShardSplit,
        seed: int,
        epoch: int,
        group_chunks: int,
        length: int,
        windows_per_chunk: int | None,
        direction: str,
        source: int = 0,
    ) -> None:
        self.split, self.seed, self.epoch = split, seed, epoch
        self.group_chunks, self.length = group_chunks, length
        self.windows_per_chunk, self.direction = windows_per_chunk, direction
        self.source = source
        self._ends: dict[int, np.ndarray] = {}  # cycle -> cumulative windows of its groups

    @cached_property
    def chunks_per_cycle(self) -> int:
        return sum(self.split.samples)

    @cached_property
    def groups_per_cycle(self) -> int:
        return -(-self.chunks_per_cycle // self.group_chunks)

    def _rng(self, *key: int) -> np.random.Generator:
        """The generator of one draw of this epoch; another set's draws are its own."""
        own = (self.source,) if self.source else ()  # set 0: the draws of a set alone
        return np.random.default_rng([self.seed, self.epoch, *key, *own])

    def shard_order(self, cycle: int) -> list[str]:
        """The URLs of cycle `cycle`, each shard once."""
        order = self._rng(cycle, 0).permutation(len(self.split.urls))
        return [self.split.urls[i] for i in order]

    def group(self, cycle: int, number: int) -> ShuffleGroup:
        chunks = min(self.group_chunks, self.chunks_per_cycle - number * self.group_chunks)
        return shuffle_group(
            self._rng(cycle, 1, number), chunks, self.split.chunk_frames, self.length,
            self.windows_per_chunk, self.direction,
        )  # fmt: skip

    def group_ends(self, cycle: int) -> np.ndarray:
        """Cumulative windows at the end of each group of a cycle."""
        if cycle not in self._ends:
            sizes = [len(self.group(cycle, g).order) for g in range(self.groups_per_cycle)]
            self._ends[cycle] = np.cumsum(sizes)
        return self._ends[cycle]

    def locate(self, window: int) -> tuple[GroupKey, int]:
        """((cycle, group), index in the group's permuted order) of window `window` of V.
        Cycles hold different numbers of windows; they are counted from the first."""
        cycle = 0
        while True:
            ends = self.group_ends(cycle)
            if window < ends[-1]:
                number = int(np.searchsorted(ends, window, side="right"))
                start = int(ends[number - 1]) if number else 0
                return (cycle, number), window - start
            window -= int(ends[-1])
            cycle += 1

    def load(
        self, key: GroupKey, want_meta: bool, skipped: list[tuple[str, str]]
    ) -> tuple[ShuffleGroup, list[Chunk | None]]:
        """Group `key` (from `locate`) and its chunks, read from the shards: those wholly
        before it skipped unopened. A skipped shard's slots are None (`ShardSplit.chunks`)."""
        cycle, number = key
        group = self.group(cycle, number)
        urls = self.shard_order(cycle)
        chunks = self.split.chunks(urls, number * self.group_chunks, want_meta, skipped)
        return group, list(itertools.islice(chunks, len(group.counts)))
