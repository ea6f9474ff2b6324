"""Training callbacks: throughput, W&B audio examples, and the export at the end of fit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from trainer.data.batch import IGNORE


class ThroughputMonitor(pl.Callback):
    """Logs `train/tokens_per_s` (target tokens per second of wall clock),
    `train/data_wait_frac` (the share of each step spent waiting for the loader) and `train/lr`."""

    def __init__(self) -> None:
        self._step_end: float | None = None
        self._step_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_end = None  # the wait for the first batch includes worker start-up

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._step_end is not None:
            wait = self._step_start - self._step_end
            total = now - self._step_end
            tokens = batch["labels"].numel()  # train rows are never masked; and no host sync
            pl_module.log_dict(
                {
                    "train/tokens_per_s": tokens / total,
                    "train/data_wait_frac": wait / total,
                    "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
                },
                on_step=True,
                on_epoch=False,
                batch_size=len(batch["labels"]),
            )
        self._step_end = now


class AudioExamples(pl.Callback):
    """Every ``every`` validation runs, logs ``seconds`` of input, target and teacher-forced
    prediction audio to W&B (only when a WandbLogger is among the trainer's loggers).

    Validation runs are counted, not epochs: with ``val_check_interval`` in steps an epoch may
    hold several (or, with iterable loaders, all) of them.
    """

    def __init__(self, every: int = 5, seconds: float = 4.0) -> None:
        self.every, self.seconds = every, seconds
        self._runs = 0
        self._clips: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clips = None
        if trainer.sanity_checking or self.every <= 0:
            return
        self._runs += 1
        if self._runs % self.every == 0 and wandb_logger(trainer.loggers) is not None:
            self._clips = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._clips is None or outputs is None:
            return
        limit = int(self.seconds * sample_rate(trainer))
        have = sum(x[0].numel() for x in self._clips)
        labels, table = batch["labels"], pl_module.int16_of_token
        for row in range(labels.shape[0]):
            keep = labels[row] != IGNORE
            if have >= limit or not bool(keep.any()):
                continue
            inp = batch["input_ids"][row][keep].clamp(max=pl_module.levels - 1)
            parts = (inp, labels[row][keep], outputs[row][keep])
            self._clips.append(tuple(table[x].cpu() for x in parts))
            have += int(keep.sum())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._clips:
            return
        rate = sample_rate(trainer)
        limit = int(self.seconds * rate)
        names = ["input", "target", "prediction (teacher-forced argmax)"]
        clips = [torch.cat([x[i] for x in self._clips])[:limit].float() / 32768 for i in range(3)]
        wandb_logger(trainer.loggers).log_audio(
            "val/audio",
            [clip.numpy() for clip in clips],
            step=trainer.global_step,
            caption=names,
            sample_rate=[rate] * 3,
        )
        self._clips = None


class ExportOnFitEnd(pl.Callback):
    """At the end of ``fit``, writes the model's export folder to ``<log dir>/export``
    (``StereoT5.save_pretrained``: loadable without this trainer's checkpoint)."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank: `log_dir` broadcasts from rank 0 under DDP
        root = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            pl_module.save_pretrained(root / "export")
        trainer.strategy.barrier("stereo_t5_export")


def wandb_logger(loggers: list[Any]) -> Any:
    """The first WandbLogger among the trainer's loggers, or None (audio is W&B only)."""
    from pytorch_lightning.loggers import WandbLogger

    return next((x for x in loggers if isinstance(x, WandbLogger)), None)


def sample_rate(trainer: pl.Trainer) -> int:
    """The training data's sample rate (the DataModule's, else 44.1 kHz)."""
    datamodule = getattr(trainer, "datamodule", None)
    return int(getattr(datamodule, "sample_rate", None) or 44100)
