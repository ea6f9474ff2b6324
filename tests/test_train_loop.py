"""Training through Lightning: exact resume of batches and steps, logging, DDP on CPU."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from conftest import TINY_MODEL
from pytorch_lightning.callbacks import ModelCheckpoint

from trainer.data import ShardDataModule
from trainer.model import StereoT5

TINY = dict(**TINY_MODEL, head="coarse_fine", warmup_steps=2)


class BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()
        self.seen[trainer.global_step] = digest


def _fit(shard_dir, root: Path, max_steps: int, ckpt_path: str | None = None):
    recorder = BatchRecorder()
    dm = ShardDataModule(
        str(shard_dir), seq_len=512, batch_size=4, num_workers=2, batches_per_epoch=6, seed=1
    )
    model = StereoT5(codec="pcm16", max_len=512, **TINY)
    trainer = pl.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        logger=False,
        callbacks=[
            recorder,
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1),
        ],
        enable_model_summary=False,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, recorder.seen


def test_resume_from_last_continues_steps_and_batches_exactly(shard_dir, tmp_path):
    _, whole = _fit(shard_dir, tmp_path / "whole", max_steps=10)
    first, _ = _fit(shard_dir, tmp_path / "cut", max_steps=4)
    assert first.global_step == 4
    trainer, resumed = _fit(
        shard_dir,
        tmp_path / "cut",
        max_steps=10,
        ckpt_path=str(tmp_path / "cut" / "ckpt" / "last.ckpt"),
    )
    assert trainer.global_step == 10
    assert sorted(resumed) == list(range(4, 10))  # no step repeated, none reset
    assert resumed == {step: whole[step] for step in range(4, 10)}  # crosses an epoch, too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_finishes_an_epoch_with_equal_steps(shard_dir, tmp_path):
    args = [
        sys.executable,
        "-m",
        "trainer",
        "fit",
        "--model.d_model",
        "32",
        "--model.d_ff",
        "64",
        "--model.num_layers",
        "1",
        "--model.num_decoder_layers",
        "1",
        "--model.num_heads",
        "2",
        "--model.d_kv",
        "16",
        "--model.head",
        "coarse_fine",
        "--data",
        "trainer.data.ShardDataModule",
        "--data.manifest",
        str(shard_dir),
        "--data.seq_len",
        "512",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "0",
        "--data.batches_per_epoch",
        "3",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]
    env = {
        "MASTER_PORT": str(_free_port()),
        "WANDB_MODE": "disabled",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    run = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3


def test_a_few_steps_train_on_a_merged_partitioned_set(tree, tmp_path):
    from conftest import SHARD_OPTIONS

    from pipeline.merge import merge_manifests
    from pipeline.shard import write_shards

    for part in ("0/2", "1/2"):
        write_shards(tree.index, tmp_path, partition=part, jobs=1, progress=False, **SHARD_OPTIONS)
    merge_manifests([tmp_path])
    trainer, seen = _fit(tmp_path, tmp_path / "run", max_steps=3)
    assert trainer.global_step == 3 and len(seen) == 3
