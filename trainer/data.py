"""Streaming loader over uint16 chunk shards, and the original random-access dataset (design §6).

Train stream. Each rank has `num_workers` virtual streams (1 when there are no workers); global
batch g of an epoch comes from stream g % streams, as PyTorch's DataLoader takes batches from
its workers in turn. A stream is a deterministic function of (seed, epoch, rank, stream):
webdataset's `ResampledShards` (deterministic, seeded) picks shards, their chunks are read in
order, and every block of `shuffle_buffer` windows' worth of chunks is cut into windows and
permuted. Everything random (shard order, window offsets, the permutation, directions) follows
from counts in the manifest, never from the data, so resuming at batch k is arithmetic: skip
whole shards unopened, skip tar members by their headers, and decode only the block that batch
k starts in. (webdataset's sliding shuffle buffer has no restorable state; this block shuffle
permutes as many windows and has one.)

Val/test: every chunk exactly once over all ranks and workers, split at sample level from the
manifest's counts; each chunk is covered by deterministic windows (the last one overlapping,
with its overlap masked), and every rank gets the same number of batches (fully masked padding).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pipeline.audio import AudioReader, is_audio_path
from pipeline.codec import Codec, get_codec, int16_to_pcm16
from pipeline.errors import PipelineError
from pipeline.records import SPLITS, ChunkMeta, Manifest, ShardInfo, load_json
from pipeline.tario import ALLOWED_EXTENSIONS, load_npy
from trainer.augment import Augment
from trainer.tasks import Task

DIRECTIONS = {"l2r": 0, "r2l": 1}
CHANNEL = Task("channel")
IGNORE = -100
SHIFTED_CHUNKS = 0.25  # train chunks whose windows start anywhere in [0, L), see TrainStream
# Samples decoded from shards in this process (tests count that resume skips without decoding).
DECODED = {"samples": 0}


def parse_direction(direction: str) -> str:
    if direction not in ("l2r", "r2l", "random"):
        raise PipelineError(
            f"direction {direction!r}: use l2r, r2l or random (`L->R` would be a shell redirect)"
        )
    return direction


def to_batch(
    inputs: np.ndarray,
    targets: np.ndarray,
    directions: np.ndarray,
    codec: Codec,
    mask: np.ndarray | None = None,
    meta: list[tuple[str, int]] | None = None,
) -> dict:
    """A batch of the structure every loader here yields, from uint16 inputs `[B, L]` and
    targets `[B, T]`; `mask` `[B, T]` marks the label positions scored."""
    input_ids, labels = codec.encode(inputs), codec.encode(targets)
    if mask is not None:
        labels = np.where(mask, labels, IGNORE)
        input_ids = np.where(mask.any(axis=1, keepdims=True), input_ids, codec.levels)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "direction": torch.from_numpy(directions.astype(np.int64)),
    }
    if meta is not None:
        batch["source"] = [m[0] for m in meta]
        batch["start"] = torch.tensor([m[1] for m in meta], dtype=torch.int64)
    return batch


def raw_batch(
    inputs: np.ndarray,
    targets: np.ndarray,
    directions: np.ndarray,
    mask: np.ndarray | None = None,
    meta: list[tuple[str, int]] | None = None,
) -> dict:
    """What a stream yields: uint16 inputs and targets, not tokens. From a worker, 64 KB of
    numpy per batch of 8 x 2048 cross processes ~10x faster than int64 tensors (one
    shared-memory segment per tensor); the loader applies the codec in the main process."""
    raw = {"inputs": inputs, "targets": targets, "directions": directions}
    if mask is not None:
        raw["mask"] = mask
    if meta is not None:
        raw["meta"] = meta
    return raw


def tokenize(raw: dict, codec: Codec) -> dict:
    return to_batch(
        raw["inputs"], raw["targets"], raw["directions"], codec, raw.get("mask"), raw.get("meta")
    )


# ---------------------------------------------------------------------------------------------
# Reading shards


def _open_tar(url: str) -> tarfile.TarFile:
    """A local path (or file:) opens seekable, so skipped members are seeked over, not read."""
    path = url[5:] if url.startswith("file:") else url
    if "://" not in url and not url.startswith("pipe:") and os.path.exists(path):
        return tarfile.open(path, mode="r:")
    return tarfile.open(fileobj=wds.gopen(url), mode="r|")


def iter_chunks(
    url: str, skip: int = 0, want_meta: bool = False
) -> Iterator[tuple[np.ndarray, tuple[str, int] | None]]:
    """(uint16 `[2, C]`, (source, start) or None) per sample of one shard, from sample `skip`.

    Only `.npy` (never unpickled) and `.json` members are allowed; anything else is refused.
    """
    number, key = -1, None  # sample number of the member being looked at
    pending: dict[str, bytes] = {}
    with _open_tar(url) as tar:
        for info in tar:
            name, dot, ext = info.name.partition(".")
            ext = dot + ext
            if ext not in ALLOWED_EXTENSIONS or not info.isfile():
                raise PipelineError(
                    f"{url}: member {info.name!r} is not .npy/.json; this loader refuses other "
                    "members (pickles included); re-create the shard with `python -m pipeline "
                    "shard`"
                )
            if name != key:
                number, key, pending = number + 1, name, {}
            if number < skip or (ext == ".json" and not want_meta):
                continue  # seeked over (local files) or read past, never decoded
            handle = tar.extractfile(info)
            pending[ext] = handle.read() if handle is not None else b""
            if ".npy" in pending and (".json" in pending or not want_meta):
                chunk = load_npy(pending.pop(".npy"))
                DECODED["samples"] += 1
                meta = None
                if want_meta:
                    record = ChunkMeta.from_json(pending.pop(".json"))
                    meta = (record.source, record.start)
                yield chunk, meta


def _check_chunk(chunk: np.ndarray, url: str, frames: int) -> None:
    if chunk.dtype != np.uint16 or chunk.shape != (2, frames):
        raise PipelineError(
            f"{url}: a sample is {chunk.dtype} {chunk.shape}, expected uint16 (2, {frames}) as "
            "its manifest says; re-create the shard set"
        )


def _shard_url(prefix: str, info: ShardInfo) -> str:
    return f"{prefix.rstrip('/')}/{info.path}"


@dataclass(frozen=True)
class ShardSplit:
    """The shards of one split: their URLs, sample counts (from the manifest), chunk length."""

    urls: list[str]
    samples: list[int]
    chunk_frames: int

    def chunks(
        self, sequence: Iterable[str], first: int, want_meta: bool
    ) -> Iterator[tuple[np.ndarray, tuple[str, int] | None]]:
        """Chunks of the shards in `sequence` (URLs of this split, repeats allowed) from chunk
        number `first` on; the shards wholly before it are skipped unopened."""
        counts = dict(zip(self.urls, self.samples, strict=True))
        passed = 0
        for url in sequence:
            count = counts[url]
            if passed + count > first:
                for chunk, meta in iter_chunks(url, max(0, first - passed), want_meta):
                    _check_chunk(chunk, url, self.chunk_frames)
                    yield chunk, meta
            passed += count


# ---------------------------------------------------------------------------------------------
# Train: deterministic block-shuffled streams


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class _Block:
    """Windows of `chunks` consecutive stream chunks, in their permuted order."""

    offsets: np.ndarray  # [chunks] first window start in each chunk
    counts: np.ndarray  # [chunks] windows in each chunk
    order: np.ndarray  # [windows] -> index into the block's windows (chunk-major)
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
        self.block_chunks = max(1, shuffle_buffer // nominal)
        self.seed, self.batches_per_epoch = seed, batches_per_epoch
        self.rank, self.world_size, self.return_meta = rank, world_size, return_meta
        # [epoch, first batch of the epoch still to deliver]; shared with workers (persistent too)
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _block(self, epoch: int, stream: int, number: int) -> _Block:
        rng = np.random.default_rng([self.seed, epoch, self.rank, stream, number])
        n, frames, length = self.block_chunks, self.chunk_frames, self.seq_len
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
        return _Block(offsets, counts, order, directions, seeds)

    def _shard_sequence(self, epoch: int, stream: int) -> Iterator[str]:
        seed = _seed(self.seed, epoch, self.rank, stream)
        shards = wds.ResampledShards(
            self.split.urls, seed=seed, worker_seed=lambda: 0, deterministic=True
        )
        for item in shards:
            yield item["url"]

    def _chunks_from(self, epoch: int, stream: int, first: int) -> Iterator[tuple]:
        """The stream's chunks from chunk number `first`; earlier ones are skipped unread."""
        return self.split.chunks(self._shard_sequence(epoch, stream), first, self.return_meta)

    def batches(self, epoch: int, stream: int, start: int) -> Iterator[dict]:
        """Batches start, start + 1, ... (numbered within the stream) of one stream, endless."""
        first_window = start * self.batch_size
        number, block_start_window, first_chunk = 0, 0, 0
        block = self._block(epoch, stream, number)
        while block_start_window + len(block.order) <= first_window:  # arithmetic skip
            block_start_window += len(block.order)
            first_chunk += self.block_chunks
            number += 1
            block = self._block(epoch, stream, number)
        chunks = self._chunks_from(epoch, stream, first_chunk)
        position = first_window - block_start_window
        rows: list[np.ndarray] = []
        dirs: list[int] = []
        seeds: list[int] = []
        meta: list[tuple[str, int]] = []
        while True:
            data = [next(chunks) for _ in range(self.block_chunks)]
            ends = np.cumsum(block.counts)
            owner = np.repeat(np.arange(self.block_chunks), block.counts)
            starts = block.offsets[owner] + self.seq_len * (
                np.arange(len(block.order)) - (ends - block.counts)[owner]
            )
            for w in range(position, len(block.order)):
                window = block.order[w]
                chunk, chunk_meta = data[owner[window]]
                s = int(starts[window])
                rows.append(chunk[:, s : s + self.seq_len])
                dirs.append(int(block.directions[w]))
                seeds.append(int(block.seeds[w]))
                if self.return_meta:
                    meta.append((chunk_meta[0], chunk_meta[1] + s))
                if len(rows) == self.batch_size:
                    directions, windows = np.array(dirs), np.stack(rows)
                    if self.augment is not None:
                        windows = self.augment(windows, seeds, self.task.window)
                    inputs, targets = self.task.pairs(windows, directions, np.array(seeds))
                    yield raw_batch(
                        inputs, targets, directions, meta=meta if self.return_meta else None
                    )
                    rows, dirs, seeds, meta = [], [], [], []
            number += 1
            position = 0
            block = self._block(epoch, stream, number)

    def __iter__(self) -> Iterator[list[dict]]:
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


# ---------------------------------------------------------------------------------------------
# Val/test: every chunk once, deterministic windows, equal batches per rank


def _even_ranges(total: int, parts: int) -> list[range]:
    return [range(total * p // parts, total * (p + 1) // parts) for p in range(parts)]


def eval_windows(chunk_frames: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts covering a chunk and a `[windows, L]` mask scoring every frame once."""
    starts = list(range(0, chunk_frames - seq_len + 1, seq_len))
    mask = np.ones((len(starts), seq_len), dtype=bool)
    if chunk_frames % seq_len:
        starts.append(chunk_frames - seq_len)
        last = np.zeros(seq_len, dtype=bool)
        last[seq_len - chunk_frames % seq_len :] = True
        mask = np.vstack([mask, last])
    return np.array(starts), mask


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

    def _samples(self, first: int, count: int) -> Iterator[tuple]:
        """Global samples [first, first + count) in manifest order."""
        return itertools.islice(self.split.chunks(self.split.urls, first, self.return_meta), count)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else info.id
        if info is not None and info.num_workers != self.slots:
            raise PipelineError("EvalStream was built for another number of workers")
        span = self.slot_ranges[self.rank][slot]
        first = self.rank_ranges[self.rank].start + span.start
        rows, masks, seeds, meta = [], [], [], []
        direction = DIRECTIONS.get(self.direction, 0)  # `random` evaluates left -> right
        split_at = self.task.split_at or 0  # the label part of a window is what is scored

        def flush() -> dict:
            n = len(rows)
            windows = np.zeros((self.batch_size, 2, self.seq_len), np.uint16)
            mask = np.zeros((self.batch_size, self.seq_len), dtype=bool)
            seed = np.zeros(self.batch_size, dtype=np.int64)
            if n:
                windows[:n], mask[:n], seed[:n] = np.stack(rows), np.stack(masks), seeds
            pad_meta = meta + [("", -1)] * (self.batch_size - n) if self.return_meta else None
            directions = np.full(self.batch_size, direction)
            inputs, targets = self.task.pairs(windows, directions, seed)
            return raw_batch(inputs, targets, directions, mask[:, split_at:], pad_meta)

        for sample, (chunk, chunk_meta) in enumerate(self._samples(first, len(span)), first):
            for number, (start, window_mask) in enumerate(zip(self.starts, self.mask, strict=True)):
                rows.append(chunk[:, start : start + self.seq_len])
                masks.append(window_mask)
                seeds.append(sample * len(self.starts) + number)  # the same on every run
                if self.return_meta:
                    meta.append((chunk_meta[0], chunk_meta[1] + int(start)))
                if len(rows) == self.batch_size:
                    yield flush()
                    rows, masks, seeds, meta = [], [], [], []
        if rows:
            yield flush()
            rows, masks, seeds, meta = [], [], [], []
        for _ in range(self.padding[slot]):
            yield flush()


# ---------------------------------------------------------------------------------------------
# DataModules


def _keep(raw: dict) -> dict:
    return raw


class ShardLoader(DataLoader):
    """A DataLoader over a shard stream that applies the codec to what the workers send.

    For the train stream, `where` tells it before every pass which epoch it is and which batch
    of the epoch comes next (the trainer's progress), so a resumed run continues exactly.
    """

    def __init__(
        self,
        dataset: TrainStream | EvalStream,
        codec: str,
        where: Callable[[], tuple[int, int]] | None = None,
        pin_memory: bool = False,
        **kw,
    ) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_keep, **kw)
        self.codec, self._where, self._pin = get_codec(codec), where, pin_memory

    def state_dict(self) -> dict:
        """Where the stream stands is the trainer's own progress (epoch, batches done), which
        the checkpoint already holds; `__iter__` reads it, so nothing else needs saving."""
        return {"position": [int(v) for v in self.dataset.position]} if self._where else {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: see `state_dict`."""

    def __iter__(self) -> Iterator[dict]:
        if self._where is not None:
            epoch, start = self._where()
            self.dataset.position[0], self.dataset.position[1] = epoch, start
        for item in super().__iter__():
            for raw in item if isinstance(item, list) else [item]:  # train streams send packs
                batch = tokenize(raw, self.codec)
                if self._pin and torch.cuda.is_available():
                    batch = {
                        k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()
                    }
                yield batch


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(pl.LightningDataModule):
    """Batches `input_ids [B, L]`, `labels [B, L]`, `direction [B]` from a shard set.

    Args:
        manifest: manifest.json of a shard set, or its folder.
        url_prefix: where the shards are (default: the manifest's folder); any URL webdataset
            opens, e.g. `pipe:aws s3 cp s3://bucket/set` (shard paths are appended).
        seq_len: input frames per window (window and target together at most the shards' chunk).
        task: `channel` (one channel from the other, the original) or `continuation` (the next
            `target_len` frames of a channel from its previous `seq_len`).
        target_len: label frames of `continuation` (default: seq_len).
        windows_per_chunk: train windows cut from each chunk (default: all it holds).
        shuffle_buffer: windows permuted together (a block of chunks).
        batches_per_epoch: train batches per epoch and rank (default: the train windows of the
            manifest divided by batch_size x ranks).
    """

    def __init__(
        self,
        manifest: str,
        url_prefix: str | None = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        codec: str = "pcm16",
        direction: str = "random",
        windows_per_chunk: int | None = None,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        return_meta: bool = False,
        task: str = "channel",
        target_len: int | None = None,
        snr_db: tuple[float, float] = (0.0, 30.0),
        bits: tuple[int, int] = (4, 12),
        cutoff: tuple[float, float] = (0.1, 0.5),
        augment: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = Task(task, seq_len, target_len, tuple(snr_db), tuple(bits), tuple(cutoff))
        try:
            self.augment = Augment(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in (augment or {}).items()}
            )
        except TypeError as exc:
            raise PipelineError(f"augment {augment}: {exc}; see trainer/augment.py") from None
        # frames read per window: the task's, and more when a speed-up must still fill it
        self.window = self.augment.read_frames(self.task.window)
        path = Path(manifest)
        self.manifest = Manifest.load(path)
        self.folder = path if path.is_dir() else path.parent
        self.url_prefix = url_prefix or str(self.folder)
        self.direction = parse_direction(direction)
        get_codec(codec)
        chunk = self.manifest.config.chunk_frames
        if self.window > chunk:
            raise PipelineError(
                f"seq_len {seq_len}{' + target_len' if self.task.split_at else ''} is larger than "
                f"the shards' chunk ({chunk} frames, {self.folder}); lower it or re-shard with "
                f"--chunk-frames {self.window}"
            )
        if windows_per_chunk is not None and not 0 < windows_per_chunk * self.window <= chunk:
            raise PipelineError(
                f"windows_per_chunk {windows_per_chunk} x {self.window} frames must fit in a "
                f"chunk of {chunk} frames"
            )

    def _split(self, split: str) -> ShardSplit:
        shards = [s for s in self.manifest.shards.get(split, []) if s.samples]
        if not shards:
            raise PipelineError(
                f"{self.folder}: no {split} shards; re-shard with a non-zero --{split} fraction"
                + (" or set trainer.limit_val_batches=0" if split == "val" else "")
            )
        return ShardSplit(
            [_shard_url(self.url_prefix, s) for s in shards],
            [s.samples for s in shards],
            self.manifest.config.chunk_frames,
        )

    def _loader_kw(self) -> dict:
        workers = self.hparams.num_workers
        return dict(
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
        )

    def train_stream(self, rank: int | None = None, world_size: int | None = None) -> TrainStream:
        split = self._split("train")
        hp = self.hparams
        if rank is None:
            rank, world_size = _world()
        per_chunk = hp.windows_per_chunk or self.manifest.config.chunk_frames // self.window
        batches = hp.batches_per_epoch or max(
            1, sum(split.samples) * per_chunk // (hp.batch_size * world_size)
        )
        return TrainStream(
            split,
            self.window,
            hp.batch_size,
            self.direction,
            hp.windows_per_chunk,
            hp.shuffle_buffer,
            hp.seed,
            batches,
            rank,
            world_size,
            hp.return_meta,
            task=self.task,
            augment=self.augment,
        )

    def _where(self) -> tuple[int, int]:
        """(epoch, batches of it already done): from the trainer, so a resume continues."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return trainer.current_epoch, done

    def train_dataloader(self) -> DataLoader:
        return ShardLoader(
            self.train_stream(), self.hparams.codec, self._where, **self._loader_kw()
        )

    def eval_stream(
        self, split: str, rank: int | None = None, world_size: int | None = None
    ) -> EvalStream:
        shards = self._split(split)
        hp = self.hparams
        if rank is None:
            rank, world_size = _world()
        return EvalStream(
            shards,
            self.task.window,  # evaluation never augments
            hp.eval_batch_size or hp.batch_size,
            self.direction,
            rank,
            world_size,
            hp.num_workers,
            hp.return_meta,
            task=self.task,
        )

    def val_dataloader(self) -> DataLoader:
        return ShardLoader(self.eval_stream("val"), self.hparams.codec, **self._loader_kw())

    def test_dataloader(self) -> DataLoader:
        return ShardLoader(self.eval_stream("test"), self.hparams.codec, **self._loader_kw())


# ---------------------------------------------------------------------------------------------
# The original trainer's random-access design, kept as a baseline


class StereoWavChunkDataset(Dataset):
    """Item i: a random file, a random offset, `seq_len` frames read from the audio file.

    What the original trainer did: files and their lengths (the lengths JSON), an int16 read of
    a random chunk, int16 + 32768 as tokens, mono duplicated / the first two channels kept, a
    random direction. Seeded per (seed, epoch, item), so a run is reproducible.
    """

    def __init__(
        self,
        lengths: dict[str, int],
        seq_len: int,
        items: int,
        codec: str = "pcm16",
        direction: str = "random",
        seed: int = 0,
    ) -> None:
        self.files = sorted(p for p, n in lengths.items() if n >= seq_len)
        if not self.files:
            raise PipelineError(f"no file holds {seq_len} frames; lower seq_len")
        self.lengths = lengths
        self.seq_len, self.items = seq_len, items
        self.codec, self.direction = get_codec(codec), parse_direction(direction)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, item: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, item)))
        path = self.files[rng.randrange(len(self.files))]
        start = rng.randrange(self.lengths[path] - self.seq_len + 1)
        with AudioReader(path) as reader:
            window = int16_to_pcm16(reader.read(start, self.seq_len))
        fixed = DIRECTIONS.get(self.direction)
        direction = rng.randrange(2) if fixed is None else fixed
        directions = np.array([direction])
        batch = to_batch(*CHANNEL.pairs(window[None], directions), directions, self.codec)
        return {k: v[0] for k, v in batch.items()}


def seed_split(files: list[str], seed: int, val: float, test: float) -> dict[str, list[str]]:
    """The original's seeded file split: shuffle, then cut test, val and train off the front."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test), round(len(order) * val)
    return {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }


def glob_lengths(root: str) -> dict[str, int]:
    """{absolute path: frames} of the audio files under root (what the lengths JSON holds)."""
    lengths = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if is_audio_path(name):
                path = os.path.abspath(os.path.join(dirpath, name))
                try:
                    with AudioReader(path) as reader:
                        lengths[path] = reader.frames
                except PipelineError:
                    continue
    return lengths


class SeedStereoDataModule(pl.LightningDataModule):
    """The original trainer's data path: glob or lengths JSON, random chunk per item.

    Args:
        root: folder of audio files (globbed when no lengths JSON is given).
        lengths_json: `{absolute path: frames}` (`python -m pipeline index --lengths-json`).
        items_per_epoch: train items per epoch (val/test: a tenth of it).
    """

    def __init__(
        self,
        root: str | None = None,
        lengths_json: str | None = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        codec: str = "pcm16",
        direction: str = "random",
        seed: int = 0,
        val: float = 0.1,
        test: float = 0.1,
        items_per_epoch: int = 10000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lengths_json:
            lengths = {k: int(v) for k, v in load_json(Path(lengths_json), "lengths JSON").items()}
        elif root:
            lengths = glob_lengths(root)
        else:
            raise PipelineError("SeedStereoDataModule needs root or lengths_json")
        self.splits = seed_split(list(lengths), seed, val, test)
        self.lengths = lengths

    def dataset(self, split: str) -> StereoWavChunkDataset:
        hp = self.hparams
        files = self.splits[split]
        if not files:
            raise PipelineError(f"the {split} split of the seed-style data is empty")
        items = hp.items_per_epoch if split == "train" else max(1, hp.items_per_epoch // 10)
        return StereoWavChunkDataset(
            {f: self.lengths[f] for f in files},
            hp.seq_len,
            items,
            hp.codec,
            hp.direction if split == "train" else "l2r",
            hp.seed + SPLITS.index(split),
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._loader("val", hp.eval_batch_size or hp.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._loader("test", hp.eval_batch_size or hp.batch_size, shuffle=False)
