"""The val/test stream: every chunk exactly once, deterministic windows (see docs/data.md).

The split is cut at sample level from the manifest's counts, over ranks and then over each
rank's workers; each chunk is covered by `eval_windows` (the last window overlapping, its
overlap masked), and every rank gets the same number of batches (fully masked padding), so
distributed evaluation never waits on a rank that ran out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from trainer.data.batch import DIRECTIONS, DataError, RawBatch, raw_batch
from trainer.data.shards import Chunk, ShardSplit
from trainer.data.tasks import Task
from trainer.data.windows import eval_windows

__all__ = ["EvalStream"]


def _even_ranges(total: int, parts: int) -> list[range]:
    return [range(total * p // parts, total * (p + 1) // parts) for p in range(parts)]


class EvalStream(IterableDataset):
    """Every chunk of a split exactly once over ranks x workers, padded to equal batch counts."""

    def __init__(
        self,
        split: ShardSplit,
        seq_len: int,
        batch_size: int,
        direction: str,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        return_meta: bool = False,
        task: Task | None = None,
    ) -> None:
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.direction = direction
        self.task = task or Task("channel", seq_len)
        self.rank, self.world_size = rank, world_size
        self.slots = max(1, workers)
        self.return_meta = return_meta
        self.starts, self.mask = eval_windows(split.chunk_frames, seq_len)
        total = sum(split.samples)
        per_slot = len(self.starts)
        ranks = _even_ranges(total, world_size)
        self.slot_ranges = [_even_ranges(len(r), self.slots) for r in ranks]
        self.rank_ranges = ranks
        counts = [
            [math.ceil(len(s) * per_slot / batch_size) for s in slots] for slots in self.slot_ranges
        ]
        target = max(sum(c) for c in counts)
        self.batch_counts = counts[rank]
        deficit = target - sum(self.batch_counts)
        # padding batches go to the slots in turn, so each rank delivers `target` batches
        self.padding = [
            deficit // self.slots + (s < deficit % self.slots) for s in range(self.slots)
        ]

    def __len__(self) -> int:
        return sum(self.batch_counts) + sum(self.padding)

    def _samples(
        self, first: int, count: int, skipped: list[tuple[str, str]]
    ) -> Iterator[Chunk | None]:
        """Global samples [first, first + count) in manifest order (None: a skipped slot)."""
        chunks = self.split.chunks(self.split.urls, first, self.return_meta, skipped)
        return itertools.islice(chunks, count)

    def __iter__(self) -> Iterator[RawBatch]:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else info.id
        if info is not None and info.num_workers != self.slots:
            raise DataError("EvalStream was built for another number of workers")
        span = self.slot_ranges[self.rank][slot]
        first = self.rank_ranges[self.rank].start + span.start
        rows, masks, seeds, meta = [], [], [], []
        skipped: list[tuple[str, str]] = []
        direction = DIRECTIONS.get(self.direction, 0)  # `random` evaluates left -> right
        split_at = self.task.split_at or 0  # the label part of a window is what is scored

        def flush() -> RawBatch:
            n = len(rows)
            windows = np.zeros((self.batch_size, 2, self.seq_len), np.uint16)
            mask = np.zeros((self.batch_size, self.seq_len), dtype=bool)
            seed = np.zeros(self.batch_size, dtype=np.int64)
            if n:
                windows[:n], mask[:n], seed[:n] = np.stack(rows), np.stack(masks), seeds
            pad_meta = meta + [("", -1)] * (self.batch_size - n) if self.return_meta else None
            directions = np.full(self.batch_size, direction)
            inputs, targets = self.task.pairs(windows, directions, seed)
            return raw_batch(inputs, targets, directions, mask[:, split_at:], pad_meta, skipped)

        empty = np.zeros((2, self.seq_len), np.uint16)
        for sample, item in enumerate(self._samples(first, len(span), skipped), first):
            for number, (start, window_mask) in enumerate(zip(self.starts, self.mask, strict=True)):
                # a skipped shard's slot keeps its windows, none of them scored
                rows.append(empty if item is None else item[0][:, start : start + self.seq_len])
                masks.append(window_mask & (item is not None))
                seeds.append(sample * len(self.starts) + number)  # the same on every run
                if self.return_meta:
                    meta.append(("", -1) if item is None else (item[1][0], item[1][1] + int(start)))
                if len(rows) == self.batch_size:
                    yield flush()
                    rows, masks, seeds, meta = [], [], [], []
        if rows:
            yield flush()
            rows, masks, seeds, meta = [], [], [], []
        for _ in range(self.padding[slot]):
            yield flush()
