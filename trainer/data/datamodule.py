"""The Lightning DataModule over a shard set (or several mixed by weight), and the loader that
tokenizes what workers send.

See docs/data.md for the streams and docs/training.md for the options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.codec import get_codec
from pipeline.errors import UserError
from pipeline.workerpool import exit_with_parent
from trainer.data.augment import Augment
from trainer.data.batch import Batch, DataError, RawBatch, parse_direction, tokenize
from trainer.data.epoch import Segment
from trainer.data.eval_stream import EvalStream
from trainer.data.mixing import ShardSet, load_sets
from trainer.data.shards import ReadPolicy, ShardSplit, shard_url
from trainer.data.tasks import Task
from trainer.data.train_stream import TrainStream

__all__ = ["ShardDataModule", "ShardLoader"]


def _keep(raw: RawBatch | list[RawBatch]) -> RawBatch | list[RawBatch]:
    return raw


def _worker_start(worker_id: int) -> None:
    """A loader worker exits when the trainer is killed (`pipeline.workerpool`)."""
    exit_with_parent()


_WORKER = "in DataLoader worker process"


def worker_message(error: UserError) -> UserError:
    """The user error a loader worker raised, with its own one-line message: torch re-raises
    it in this process built from "Caught X in DataLoader worker process N. Original
    Traceback ..." and the whole traceback, whose last line is `module.X: message`."""
    text = str(error)
    if not text.startswith("Caught ") or _WORKER not in text.split("\n", 1)[0]:
        return error
    last = text.rstrip().rsplit("\n", 1)[-1]
    prefix, _, message = last.partition(": ")
    return type(error)(message if prefix.rsplit(".", 1)[-1] == type(error).__name__ else last)


def _mixture(sets: Sequence[tuple[str, float]]) -> str:
    """`path xweight, ...` of a loader's recorded sets ("one set" for a checkpoint without)."""
    return ", ".join(f"{path} x{weight:g}" for path, weight in sets) or "one set"


class ShardLoader(DataLoader):
    """A DataLoader over a shard stream that applies the codec to what the workers send.

    For the train stream, `where` tells it before every pass which epoch it is and which batch
    of the epoch comes next (the trainer's progress), so a resumed run continues exactly;
    `mixture` (manifest, weight) are the shard sets it mixes, kept in its state. `name` is an eval
    loader's shard set, for its metrics (trainer/model/eval_sums.py).
    """

    def __init__(
        self,
        dataset: TrainStream | EvalStream,
        codec: str,
        where: Callable[[], tuple[int, int]] | None = None,
        pin_memory: bool = False,
        mixture: Sequence[tuple[str, float]] = (),
        name: str = "",
        **kw,
    ) -> None:
        kw.setdefault("worker_init_fn", _worker_start)
        super().__init__(dataset, batch_size=None, collate_fn=_keep, **kw)
        self.codec, self._where, self._pin = get_codec(codec), where, pin_memory
        self.mixture, self.name = [(str(p), float(w)) for p, w in mixture], name
        self.skipped: dict[str, str] = {}  # shard url -> why, each reported once

    def state_dict(self) -> dict:
        """Where the train stream stands: the trainer's own progress (epoch, batches done, the
        same on every rank), and the layouts the epoch has run under, so that a run resumed
        with other ranks or workers consumes what is left of it (trainer/data/epoch.py)."""
        if self._where is None:
            return {}
        epoch, done = self._where()
        stream = self.dataset
        return {
            "position": [epoch, done],
            "global_batch": stream.layout.batch * stream.layout.ranks,
            "steps": stream.batches_per_epoch,
            "segments": [segment.to_dict() for segment in stream.segments(epoch)],
            "sets": [list(entry) for entry in self.mixture],
        }

    def load_state_dict(self, state: dict) -> None:
        """The epoch's layouts from a checkpoint; its mixture of sets, global batch and epoch
        length must be this run's."""
        if self._where is None or "segments" not in state:
            return
        self._check_sets([(str(p), float(w)) for p, w in state.get("sets", [])])
        stream = self.dataset
        batch = stream.layout.batch * stream.layout.ranks
        if state["global_batch"] != batch:
            raise DataError(
                f"the checkpoint trained with a global batch of {state['global_batch']} windows, "
                f"this run has {batch} ({stream.layout.ranks} ranks x batch_size "
                f"{stream.layout.batch}); set data.init_args.global_batch_size "
                f"{state['global_batch']} to resume it"
            )
        if state["steps"] != stream.batches_per_epoch:
            raise DataError(
                f"the checkpoint's epochs are {state['steps']} steps, this run's "
                f"{stream.batches_per_epoch}; set data.init_args.batches_per_epoch "
                f"{state['steps']} to resume it"
            )
        epoch, done = (int(v) for v in state["position"])
        stream.resume(epoch, done, [Segment.from_dict(segment) for segment in state["segments"]])

    def _check_sets(self, theirs: list[tuple[str, float]]) -> None:
        """A mixed epoch is its sets' and weights' own: resume it only with the same mixture
        (a set alone resumes as before, wherever its manifest now is)."""
        if (len(theirs) > 1 or len(self.mixture) > 1) and theirs != self.mixture:
            raise DataError(
                f"the checkpoint trained on the shard sets {_mixture(theirs)}, this run mixes "
                f"{_mixture(self.mixture)}; resume with the checkpoint's data.init_args.manifest"
            )

    def __iter__(self) -> Iterator[Batch]:
        if self._where is not None:
            epoch, start = self._where()
            self.dataset.position[0], self.dataset.position[1] = epoch, start
        try:
            for item in super().__iter__():
                for raw in item if isinstance(item, list) else [item]:  # train: packs
                    self._report(raw.get("skipped", []))
                    yield self._batch(raw)
        except UserError as error:
            cleaned = worker_message(error)
            if cleaned is error:
                raise
            raise cleaned from None

    def _report(self, skipped: list[tuple[str, str]]) -> None:
        for url, why in skipped:
            if url not in self.skipped:
                self.skipped[url] = why
                print(f"warning: {why} (on_corrupt: skip)", file=sys.stderr, flush=True)

    def _batch(self, raw: RawBatch) -> Batch:
        batch = tokenize(raw, self.codec)
        if self._pin and torch.cuda.is_available():
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(pl.LightningDataModule):
    """Batches `input_ids [B, L]`, `labels [B, L]`, `direction [B]` from a shard set.

    Args:
        manifest: manifest.json of a shard set, or its folder: a path or an `s3://` URL
            (`s3://bucket/set` or `s3://bucket/set/manifest.json`); or a list of sets to mix,
            `[{path: A, weight: 3}, {path: B, weight: 1}]` (weight > 0, default 1; each may
            have its own `url_prefix`), sharded alike (trainer/data/mixing.py). Validation and
            test report each set and all of them pooled.
        url_prefix: where the shards are (default: the manifest's folder); an `s3://` prefix or
            any URL webdataset opens, e.g. `pipe:aws s3 cp s3://bucket/set` (shard paths are
            appended). One set only: a mixture's sets give theirs in their entries.
        storage_options: fsspec's options for `s3://` manifests and shards (s3fs's, e.g.
            `{"endpoint_url": "http://127.0.0.1:9000"}`; default: the AWS environment
            variables and config files).
        seq_len: input frames per window (window and target together at most the shards' chunk).
        task: `channel` (one channel from the other, the original) or `continuation` (the next
            `target_len` frames of a channel from its previous `seq_len`).
        target_len: label frames of `continuation` (default: seq_len).
        windows_per_chunk: train windows cut from each chunk (default: all it holds).
        shuffle_buffer: windows permuted together (a shuffle group of chunks).
        batches_per_epoch: train steps per epoch, the same on every rank (default: the train
            windows of the manifest, of all mixed sets together, over the global batch); an
            epoch is that many global batches of one order of windows, whatever the ranks and
            workers.
        global_batch_size: train windows per step over all ranks (default: batch_size x
            ranks); set it to resume a run on another number of ranks.
        on_corrupt: `fail` (stop at a shard that cannot be read whole) or `skip` (report it
            once, leave its unread samples out unscored, go on; positions stay exact).
        read_retries: times a remote shard (any URL but a local path) that fails is read
            again, from the sample it stopped at, before `on_corrupt` applies.
        retry_backoff_s: the wait before the first retry; it doubles with each.
    """

    def __init__(
        self,
        manifest: str | list[dict[str, Any]],
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
        global_batch_size: int | None = None,
        on_corrupt: str = "fail",
        read_retries: int = 3,
        retry_backoff_s: float = 1.0,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.read_policy = ReadPolicy(on_corrupt, read_retries, retry_backoff_s)
        self.task = Task(task, seq_len, target_len, tuple(snr_db), tuple(bits), tuple(cutoff))
        try:
            self.augment = Augment(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in (augment or {}).items()}
            )
        except TypeError as exc:
            raise DataError(f"augment {augment}: {exc}; see trainer/data/augment.py") from None
        # the task's window, and more when a speed-up must still fill it
        self.read_frames = self.augment.read_frames(self.task.window)
        self.storage_options = dict(storage_options or {})
        self.sets: list[ShardSet] = load_sets(manifest, url_prefix, self.storage_options)
        # the first set's (the only one, unmixed); mixed sets share chunk length and rate
        first = self.sets[0]
        self.manifest, self.folder, self.url_prefix = first.manifest, first.folder, first.url_prefix
        self.sample_rate = int(self.manifest.config.sample_rate)  # W&B audio examples play at it
        self.direction = parse_direction(direction)
        get_codec(codec)
        chunk = self.manifest.config.chunk_frames
        if self.read_frames > chunk:
            raise DataError(
                f"seq_len {seq_len}{' + target_len' if self.task.split_at else ''} is larger than "
                f"the shards' chunk ({chunk} frames, {self.folder}); lower it or re-shard with "
                f"--chunk-frames {self.read_frames}"
            )
        if windows_per_chunk is not None and not 0 < windows_per_chunk * self.read_frames <= chunk:
            raise DataError(
                f"windows_per_chunk {windows_per_chunk} x {self.read_frames} frames must fit in a "
                f"chunk of {chunk} frames"
            )

    def _split(self, split: str, shard_set: ShardSet) -> ShardSplit:
        config = shard_set.manifest.config
        shards = [s for s in shard_set.manifest.shards.get(split, []) if s.samples]
        if not shards:
            if split == "train":
                fix = "re-shard with smaller --val and --test"
            else:
                fix = (
                    f"re-shard with a larger --{split} (now {getattr(config, split)}"
                    ") or more groups to split (--group-by file splits files, not folders)"
                )
            raise DataError(
                f"{shard_set.folder}: the {split} split holds no shards; {fix}"
                + (", or set trainer.limit_val_batches=0" if split == "val" else "")
            )
        return ShardSplit(
            [shard_url(shard_set.url_prefix, s) for s in shards],
            [s.samples for s in shards],
            config.chunk_frames,
            self.read_policy,
            self.storage_options,
        )

    def _loader_kw(self) -> dict:
        workers = self.hparams.num_workers
        return dict(
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
        )

    def train_stream(self, rank: int | None = None, world_size: int | None = None) -> TrainStream:
        splits = [self._split("train", shard_set) for shard_set in self.sets]
        hp = self.hparams
        if rank is None:
            rank, world_size = _world()
        per_chunk = hp.windows_per_chunk or self.manifest.config.chunk_frames // self.read_frames
        batch = hp.batch_size
        if hp.global_batch_size is not None:
            batch, rest = divmod(hp.global_batch_size, world_size)
            if rest or not batch:
                raise DataError(
                    f"global_batch_size {hp.global_batch_size} does not split over "
                    f"{world_size} ranks; pick a multiple of {world_size}"
                )
        batches = hp.batches_per_epoch or max(
            1, sum(sum(split.samples) for split in splits) * per_chunk // (batch * world_size)
        )
        return TrainStream(
            splits,
            self.read_frames,
            batch,
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
            workers=hp.num_workers,
            weights=[shard_set.weight for shard_set in self.sets],
        )

    def _where(self) -> tuple[int, int]:
        """(epoch, batches of it already done): from the trainer, so a resume continues."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return trainer.current_epoch, done

    def train_dataloader(self) -> DataLoader:
        mixture = [(shard_set.location, shard_set.weight) for shard_set in self.sets]
        return ShardLoader(
            self.train_stream(),
            self.hparams.codec,
            self._where,
            mixture=mixture,
            **self._loader_kw(),
        )

    def eval_stream(
        self, split: str, rank: int | None = None, world_size: int | None = None, source: int = 0
    ) -> EvalStream:
        """Split `split` of shard set number `source` (of the mixture), on `rank`."""
        shards = self._split(split, self.sets[source])
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

    def _eval_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        """One loader, or one per mixed set (each named, for its own metrics)."""
        codec, kw = self.hparams.codec, self._loader_kw()
        loaders = [
            ShardLoader(self.eval_stream(split, source=source), codec, name=shard_set.name, **kw)
            for source, shard_set in enumerate(self.sets)
        ]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders("test")
