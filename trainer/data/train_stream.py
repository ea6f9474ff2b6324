"""The train stream: deterministic shuffle groups with an arithmetic resume (see docs/data.md).

Each rank has `num_workers` virtual streams (1 when there are no workers); global batch g of an
epoch comes from stream g % streams, as PyTorch's DataLoader takes batches from its workers in
turn. A stream is a deterministic function of (seed, epoch, rank, stream): webdataset's
`ResampledShards` (deterministic, seeded) picks shards, their chunks are read in order, and
every shuffle group (the chunks that hold `shuffle_buffer` windows) is cut into windows and
permuted. Everything random (shard order, window offsets, the permutation, directions) follows
from counts in the manifest, never from the data, so resuming at batch k is arithmetic: skip
whole shards unopened, skip tar members by their headers, and decode only the shuffle group
that batch k starts in. (webdataset's sliding shuffle buffer has no restorable state; this
group shuffle permutes as many windows and has one.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from trainer.data.augment import Augment
from trainer.data.batch import DIRECTIONS, RawBatch, raw_batch
from trainer.data.shards import Chunk, ShardSplit
from trainer.data.tasks import Task

__all__ = ["SHIFTED_CHUNKS", "ShuffleGroup", "TrainStream"]

SHIFTED_CHUNKS = 0.25  # train chunks whose windows start anywhere in [0, L), see TrainStream


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class ShuffleGroup:
    """The windows of `group_chunks` consecutive stream chunks, in their permuted order."""

    offsets: np.ndarray  # [chunks] first window start in each chunk
    counts: np.ndarray  # [chunks] windows in each chunk
    order: np.ndarray  # [windows] -> index into the group's windows (chunk-major)
    directions: np.ndarray  # [windows] in output order
    seeds: np.ndarray  # [windows] in output order: each window's own RNG seed (tasks)


class TrainStream(IterableDataset):
    """Infinite-within-an-epoch batches for one rank; see the module docstring."""

    def __init__(
        self,
        split: ShardSplit,
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
    ) -> None:
        self.split, self.chunk_frames = split, split.chunk_frames
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

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _group(self, epoch: int, stream: int, number: int) -> ShuffleGroup:
        rng = np.random.default_rng([self.seed, epoch, self.rank, stream, number])
        n, frames, length = self.group_chunks, self.chunk_frames, self.seq_len
        if self.windows_per_chunk:
            counts = np.full(n, self.windows_per_chunk)
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
        if self.direction == "random":
            directions = rng.integers(0, 2, size=len(order))
        else:
            directions = np.full(len(order), DIRECTIONS[self.direction])
        seeds = rng.integers(0, 2**63, size=len(order))
        return ShuffleGroup(offsets, counts, order, directions, seeds)

    def _shard_sequence(self, epoch: int, stream: int) -> Iterator[str]:
        seed = _seed(self.seed, epoch, self.rank, stream)
        shards = wds.ResampledShards(
            self.split.urls, seed=seed, worker_seed=lambda: 0, deterministic=True
        )
        for item in shards:
            yield item["url"]

    def _chunks_from(
        self, epoch: int, stream: int, first: int, skipped: list[tuple[str, str]]
    ) -> Iterator[Chunk | None]:
        """The stream's chunks from chunk number `first`; earlier ones are skipped unread."""
        return self.split.chunks(
            self._shard_sequence(epoch, stream), first, self.return_meta, skipped
        )

    def batches(self, epoch: int, stream: int, start: int) -> Iterator[RawBatch]:
        """Batches start, start + 1, ... (numbered within the stream) of one stream, endless."""
        first_window = start * self.batch_size
        number, group_start_window, first_chunk = 0, 0, 0
        group = self._group(epoch, stream, number)
        while group_start_window + len(group.order) <= first_window:  # arithmetic skip
            group_start_window += len(group.order)
            first_chunk += self.group_chunks
            number += 1
            group = self._group(epoch, stream, number)
        skipped: list[tuple[str, str]] = []
        chunks = self._chunks_from(epoch, stream, first_chunk, skipped)
        position = first_window - group_start_window
        rows: list[np.ndarray] = []
        dirs: list[int] = []
        seeds: list[int] = []
        meta: list[tuple[str, int]] = []
        scored: list[bool] = []  # False: a window of a skipped shard's empty slot
        empty = np.zeros((2, self.seq_len), np.uint16)
        while True:
            data = [next(chunks) for _ in range(self.group_chunks)]
            ends = np.cumsum(group.counts)
            owner = np.repeat(np.arange(self.group_chunks), group.counts)
            starts = group.offsets[owner] + self.seq_len * (
                np.arange(len(group.order)) - (ends - group.counts)[owner]
            )
            for w in range(position, len(group.order)):
                window = group.order[w]
                item = data[owner[window]]
                s = int(starts[window])
                rows.append(empty if item is None else item[0][:, s : s + self.seq_len])
                scored.append(item is not None)
                dirs.append(int(group.directions[w]))
                seeds.append(int(group.seeds[w]))
                if self.return_meta:
                    meta.append(("", -1) if item is None else (item[1][0], item[1][1] + s))
                if len(rows) == self.batch_size:
                    yield self._batch(rows, np.array(dirs), seeds, meta, scored, skipped)
                    rows, dirs, seeds, meta, scored = [], [], [], [], []
            del data  # before the next group is read: one group's chunks held, not two
            number += 1
            position = 0
            group = self._group(epoch, stream, number)

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
        """Packs of `pack` consecutive batches of this worker's stream, from the trainer's position.

        Global batch g is batch i = g % pack of pack q = g // pack; pack q comes from stream
        q % workers as its (q // workers)-th pack, and the DataLoader takes packs from its
        workers in turn. A pass starting at batch k gives worker w packs q0 + w, q0 + w + W, ...
        (q0 = k // pack), the first of them cut to start at k.
        """
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start = (int(v) for v in self.position)
        total, size = self.batches_per_epoch, self.pack
        first_pack = start // size + worker
        stream = first_pack % workers
        first = max(start, first_pack * size)  # global number of this worker's first batch
        local = (first_pack // workers) * size + first % size
        batches = self.batches(epoch, stream, local)
        pack_number, g = first_pack, first
        while g < total:
            end = min((pack_number + 1) * size, total)
            yield [next(batches) for _ in range(end - g)]
            pack_number += workers
            g = pack_number * size
