"""Training callbacks: how fast tokens flow and how much of each step waits for data."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


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
