"""The train stream: the elastic epoch of trainer/data/epoch.py, read and cut into batches.

One epoch is one order of windows whatever the number of ranks and workers (see epoch.py and
docs/data.md): each rank's loader workers are virtual streams of a `Layout`, pack q of an epoch
segment comes from virtual stream q % streams (as PyTorch's DataLoader takes batches from its
workers in turn), and a stream reads the shuffle groups of its runs: whole shards before them
skipped unopened, tar members skipped by their headers, only its groups decoded. Everything
random (shard order, window offsets, the permutation, directions) follows from counts in the
manifest, never from the data, so resuming at step k is arithmetic, under the same layout or
another one. Several shard sets mix by weight (trainer/data/mixing.py): their groups
interleave in one V, and the stream reads it the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from trainer.data.augment import Augment
from trainer.data.batch import DataError, RawBatch, raw_batch
from trainer.data.epoch import (
    GroupKey,
    Layout,
    Segment,
    ShuffleGroup,
    Windows,
    consumed_after,
    positions_to_windows,
    stream_position,
)
from trainer.data.mixing import MixedWindows
from trainer.data.shards import Chunk, ShardSplit
from trainer.data.tasks import Task

__all__ = ["TrainStream"]


class TrainStream(IterableDataset):
    """One rank's batches of the elastic epoch; see the module docstring. `workers` is the
    loader's (its virtual streams); `resumed` (epoch, segments), set from a checkpoint, holds
    the layouts that epoch ran under before. `splits` are the train splits of the shard sets,
    sharded alike, mixed by `weights` when there are several."""

    def __init__(
        self,
        splits: Sequence[ShardSplit],
        seq_len: int,
        batch_size: int,
        direction: str,
        windows_per_chunk: int | None,
        shuffle_buffer: int,
        seed: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        return_meta: bool = False,
        pack: int = 8,
        task: Task | None = None,
        augment: Augment | None = None,
        workers: int = 0,
        weights: Sequence[float] = (1.0,),
    ) -> None:
        if len(weights) != len(splits):
            raise DataError(f"{len(splits)} shard sets but {len(weights)} weights")
        self.splits, self.weights = list(splits), [float(w) for w in weights]
        self.chunk_frames = splits[0].chunk_frames
        self.seq_len, self.batch_size = seq_len, batch_size
        self.direction, self.pack = direction, pack
        self.task = task or Task("channel", seq_len)
        self.augment = augment if augment is not None and augment.active else None
        self.windows_per_chunk = windows_per_chunk
        nominal = windows_per_chunk or self.chunk_frames // seq_len
        self.group_chunks = max(1, shuffle_buffer // nominal)
        self.seed, self.batches_per_epoch = seed, batches_per_epoch
        self.rank, self.world_size, self.return_meta = rank, world_size, return_meta
        # [epoch, first batch of the epoch still to deliver]; shared with workers (persistent too)
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        # a stream's run is about one shuffle group, in whole packs
        runs = max(1, round(self.group_chunks * nominal / (batch_size * pack)))
        self.layout = Layout(world_size, max(1, workers), batch_size, pack, runs * pack)
        self.resumed: tuple[int, list[Segment]] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def split(self) -> ShardSplit:
        """The train split of the first shard set (the only one, unmixed)."""
        return self.splits[0]

    def resume(self, epoch: int, done: int, segments: list[Segment]) -> None:
        """Go on with epoch `epoch` after its first `done` steps, which ran under `segments`
        (from a checkpoint): under another layout, over what they left (epoch.py)."""
        last = segments[-1]
        if last.layout != self.layout:
            steps = self.batches_per_epoch - last.start
            left = consumed_after(last, steps, done - last.start)
            segments = [*segments, Segment(done, self.layout, left)]
        self.resumed = (epoch, segments)

    def segments(self, epoch: int) -> list[Segment]:
        """The layouts of `epoch` so far, the last one this run's."""
        if self.resumed is not None and self.resumed[0] == epoch:
            return self.resumed[1]
        return [Segment.fresh(self.layout)]

    def batches(self, epoch: int, stream: int, start: int) -> Iterator[RawBatch]:
        """Batches start, start + 1, ... of global stream `stream` of a fresh epoch."""
        return self.stream_batches(epoch, Segment.fresh(self.layout), stream, start)

    def _windows(self, epoch: int) -> Windows | MixedWindows:
        """V of epoch `epoch`: one set's own, or the sets' interleaved by weight."""
        draws = (self.seed, epoch, self.group_chunks, self.seq_len, self.windows_per_chunk)
        sets = [
            Windows(split, *draws, self.direction, source)
            for source, split in enumerate(self.splits)
        ]
        return sets[0] if len(sets) == 1 else MixedWindows(sets, self.weights, self.seed, epoch)

    def stream_batches(
        self, epoch: int, segment: Segment, stream: int, first: int
    ) -> Iterator[RawBatch]:
        """Batches first, first + 1, ... of global stream `stream` in `segment`."""
        windows, steps = self._windows(epoch), self.batches_per_epoch - segment.start
        cache: dict[GroupKey, tuple[ShuffleGroup, list[Chunk | None], np.ndarray]] = {}
        skipped: list[tuple[str, str]] = []
        empty = np.zeros((2, self.seq_len), np.uint16)
        for number in itertools.count(first):
            at = stream_position(segment.layout, steps, stream, number)
            rows, dirs, seeds, meta, scored = [], [], [], [], []
            for window in positions_to_windows(segment.sequence, at, self.batch_size):
                key, index = windows.locate(window)
                if key not in cache:
                    cache.clear()  # a run moves forward: one group held at a time
                    group, data = windows.load(key, self.return_meta, skipped)
                    cache[key] = (group, data, np.cumsum(group.counts))
                group, data, ends = cache[key]
                w = int(group.order[index])
                owner = int(np.searchsorted(ends, w, side="right"))
                s = int(group.offsets[owner]) + self.seq_len * (
                    w - int(ends[owner] - group.counts[owner])
                )
                item = data[owner]
                rows.append(empty if item is None else item[0][:, s : s + self.seq_len])
                scored.append(item is not None)
                dirs.append(int(group.directions[index]))
                seeds.append(int(group.seeds[index]))
                if self.return_meta:
                    meta.append(("", -1) if item is None else (item[1][0], item[1][1] + s))
            yield self._batch(rows, np.array(dirs), seeds, meta, scored, skipped)

    def _batch(
        self,
        rows: list[np.ndarray],
        directions: np.ndarray,
        seeds: list[int],
        meta: list[tuple[str, int]],
        scored: list[bool],
        skipped: list[tuple[str, str]],
    ) -> RawBatch:
        """One batch of windows; the rows of a skipped shard's empty slots are not scored."""
        windows = np.stack(rows)
        if self.augment is not None:
            windows = self.augment(windows, seeds, self.task.window)
        inputs, targets = self.task.pairs(windows, directions, np.array(seeds))
        mask = None if all(scored) else np.repeat(np.array(scored)[:, None], targets.shape[1], 1)
        return raw_batch(
            inputs, targets, directions, mask, meta if self.return_meta else None, skipped
        )

    def __iter__(self) -> Iterator[list[RawBatch]]:
        """Packs of this worker's virtual stream, from the trainer's position: pack q of the
        segment comes from virtual stream q % streams, as the DataLoader takes packs from its
        workers in turn; a pass starting at step k gives worker w packs q0 + w, q0 + w + W, ...
        (q0 = k // pack), the first of them cut to start at k."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start = (int(v) for v in self.position)
        segment = self.segments(epoch)[-1]
        layout, size = segment.layout, self.pack
        if workers != layout.streams:
            raise DataError(f"TrainStream was built for {layout.streams} workers, not {workers}")
        done, steps = start - segment.start, self.batches_per_epoch - segment.start
        first_pack = done // size + worker
        virtual = first_pack % workers
        g = max(done, first_pack * size)
        local = (first_pack // workers) * size + g % size
        batches = self.stream_batches(epoch, segment, self.rank * workers + virtual, local)
        pack_number = first_pack
        while g < steps:
            end = min((pack_number + 1) * size, steps)
            yield [next(batches) for _ in range(end - g)]
            pack_number += workers
            g = pack_number * size
