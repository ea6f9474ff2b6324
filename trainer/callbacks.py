"""Training callbacks: throughput, W&B audio examples, and the export at the end of fit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import nn

from trainer.data.batch import IGNORE

if TYPE_CHECKING:
    from trainer.model import StereoT5


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's data sheets, by a word of
# `torch.cuda.get_device_name()`; a device not listed logs no MFU unless given `peak_flops`.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The table's bf16 peak for a CUDA device (the first entry whose words all appear in
    its name, so "A10" is not an "A10G"), else None."""
    if device.type != "cuda":
        return None
    words = set(torch.cuda.get_device_name(device).replace("-", " ").split())
    return next((v for k, v in PEAK_BF16_FLOPS.items() if set(k.split()) <= words), None)


def matmul_macs(module: nn.Module | None) -> int:
    """Multiply-adds of applying every matrix weight of ``module`` once: nn.Linear weights and
    attention input projections (embedding tables are lookups, no arithmetic)."""
    if module is None:
        return 0
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.weight.numel()
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            total += sub.in_proj_weight.numel()
    return total


def model_flops_per_token(model: StereoT5, length: int) -> float:
    """Training FLOPs per target sample of a window of ``length`` samples: 3 x the forward's
    matmuls (backward is two matmuls per forward one), formula in docs/training.md."""
    config, patch = model.config, model.patch_size
    window = min(model.body_window or length, length) // patch  # keys each query attends
    inner = config.num_heads * config.d_kv
    attention_layers = config.num_layers + 2 * config.num_decoder_layers  # self, self + cross
    body = matmul_macs(model.body.encoder) + matmul_macs(model.body.decoder)
    per_sample = (body + attention_layers * 2 * inner * window) / patch
    per_sample += matmul_macs(model.head) + matmul_macs(model.estimator)
    per_sample += 2 * matmul_macs(model.value_embed)  # encoder and decoder inputs
    if model.patch is not None:
        two = model.patch
        projections = (two.encoder_in, two.decoder_in, two.align_in, two.to_local)
        per_sample += sum(matmul_macs(x) for x in projections) / patch
        per_sample += 3 * matmul_macs(two.value)  # input, previous patch, previous sample
        per_sample += matmul_macs(two.local) + len(two.local.layers) * 2 * two.local_d * patch
    return 3 * 2 * per_sample


class ThroughputMonitor(pl.Callback):
    """Logs `train/tokens_per_s` (target tokens per second of wall clock), `train/data_wait_frac`
    (the share of that time the host waited for the loader), `train/lr`,
    `train/model_flops_per_token` (``model_flops_per_token``) and, where the device's bf16 peak
    is known (``PEAK_BF16_FLOPS``) or given as ``peak_flops``, `train/mfu` (model FLOPs per
    second over the peak).

    On a CPU a step is done when it returns, so each step is timed on its own. On a GPU the
    host runs ahead of the device and a step's end on the host clock is its launch, so the
    monitor synchronises with the device every ``sync_every`` steps (one host sync per window)
    and logs the window's figures until the next one closes.
    """

    def __init__(self, sync_every: int = 50, peak_flops: float | None = None) -> None:
        if sync_every < 1:
            raise ValueError(f"ThroughputMonitor: sync_every must be >= 1, got {sync_every}")
        self.sync_every, self.peak_flops = sync_every, peak_flops
        self._window_start: float | None = None
        self._step_end = self._wait = self._flops = 0.0
        self._tokens = self._steps = 0
        self._shown: dict[str, float] = {}  # the last closed window's figures
        self._flops_of: dict[int, float] = {}  # window length -> model FLOPs per token

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window_start = None  # the wait for the first batch includes worker start-up
        self._wait = self._flops = 0.0
        self._tokens = self._steps = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_start is not None:
            self._wait += time.perf_counter() - self._step_end

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        labels = batch["labels"]  # train rows are never masked: numel counts targets, no sync
        device, length = labels.device, labels.shape[1]
        if length not in self._flops_of:
            self._flops_of[length] = model_flops_per_token(pl_module, length)
        if self._window_start is None:  # an epoch's first step only opens a window
            self._open(device)
            return
        self._steps += 1
        self._tokens += labels.numel()
        self._flops += labels.numel() * self._flops_of[length]
        if self._steps >= (self.sync_every if device.type == "cuda" else 1):
            total = self._open(device, closing=True)
            self._shown = {
                "train/tokens_per_s": self._tokens / total,
                "train/data_wait_frac": self._wait / total,
                "train/model_flops_per_token": self._flops_of[length],
            }
            peak = self.peak_flops or device_peak_flops(device)
            if peak:
                self._shown["train/mfu"] = self._flops / total / peak
            self._wait = self._flops = 0.0
            self._tokens = self._steps = 0
        else:
            self._step_end = time.perf_counter()
        if self._shown:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            pl_module.log_dict(
                {**self._shown, "train/lr": lr}, on_step=True, on_epoch=False,
                batch_size=len(labels),
            )  # fmt: skip

    def _open(self, device: torch.device, closing: bool = False) -> float:
        """Start a window now (after the device's queued work); the closed one's seconds."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        seconds = now - self._window_start if closing else 0.0
        self._window_start = self._step_end = now
        return seconds


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
