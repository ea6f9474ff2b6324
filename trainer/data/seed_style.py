"""The original trainer's random-access data path, kept as a baseline (see docs/data.md).

Files and their lengths (a lengths JSON, or a glob), an int16 read of a random window of a
random file per item, int16 + 32768 as tokens, mono duplicated / the first two channels kept,
a random direction. The shard loader replaces it; the loader benchmark measures both.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from pipeline.audio import AudioReader, is_audio_path
from pipeline.codec import get_codec, int16_to_pcm16
from pipeline.errors import PipelineError
from pipeline.records import SPLITS, load_json
from trainer.data.batch import DIRECTIONS, Batch, DataError, parse_direction, to_batch
from trainer.data.tasks import Task

__all__ = ["SeedStereoDataModule", "StereoWavChunkDataset", "glob_lengths", "seed_split"]

CHANNEL = Task("channel")


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
            raise DataError(f"no file holds {seq_len} frames; lower seq_len")
        self.lengths = lengths
        self.seq_len, self.items = seq_len, items
        self.codec, self.direction = get_codec(codec), parse_direction(direction)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, item: int) -> Batch:
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
            raise DataError("SeedStereoDataModule needs root or lengths_json")
        self.splits = seed_split(list(lengths), seed, val, test)
        self.lengths = lengths

    def dataset(self, split: str) -> StereoWavChunkDataset:
        hp = self.hparams
        files = self.splits[split]
        if not files:
            raise DataError(f"the {split} split of the seed-style data is empty")
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
