"""`kill -9` of `fit` while a checkpoint is being written: the last whole checkpoint loads, the
partial one never sits under a final name, and `--ckpt_path last` goes on with the batches the
uninterrupted run saw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from test_cli_train import REPO, _args

# Runs `python -m trainer fit` with a callback that appends each step's batch digest to
# RECORD; with KILL_AT_SAVE=N the N-th checkpoint write stops half-way with SIGKILL.
_SCRIPT = """
import hashlib, io, json, os, signal, sys
import pytorch_lightning as pl
import torch
import trainer.cli as cli

record, kill_at = sys.argv[1], int(os.environ.get("KILL_AT_SAVE", "0"))

class Recorder(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()
        with open(record, "a") as f:
            f.write(json.dumps([trainer.global_step, digest]) + "\\n")

defaults = cli.trainer_defaults
def with_recorder():
    options = defaults()
    options["callbacks"].append(Recorder())
    return options
cli.trainer_defaults = with_recorder

saves, save = [0], torch.save
def dying_save(obj, f, *args, **kw):
    saves[0] += 1
    if saves[0] != kill_at:
        return save(obj, f, *args, **kw)
    buffer = io.BytesIO()
    save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save

cli.main(sys.argv[2:])
"""


def _fit(shard_dir: Path, root: Path, record: Path, kill_at: int = 0, *extra: str) -> int:
    script = root.parent / "fit_recorded.py"
    script.write_text(_SCRIPT)
    args = _args(
        shard_dir,
        root,
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.batches_per_epoch",
        "4",
        "--trainer.logger",
        "false",
        *extra,
    )
    env = {**os.environ, "KILL_AT_SAVE": str(kill_at), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), str(record), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode


def _steps(record: Path) -> dict[int, str]:
    return {step: digest for step, digest in map(json.loads, record.read_text().splitlines())}


def test_kill_during_a_checkpoint_write_then_resume_sees_the_uninterrupted_batches(
    shard_dir, tmp_path
):
    whole = tmp_path / "whole.jsonl"
    assert _fit(shard_dir, tmp_path / "whole", whole) == 0
    cut, root = tmp_path / "cut.jsonl", tmp_path / "cut"
    # saves 1-2: best and last at step 2; save 4 is last.ckpt at step 4, killed half-way;
    # the resumed run goes from step 2 over the epoch's end at step 4 on to step 6
    assert _fit(shard_dir, root, cut, kill_at=4) == -signal.SIGKILL
    folder = root / "checkpoints"
    partial = list(folder.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1  # the write that was killed, beside its target
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 2
    again = tmp_path / "resumed.jsonl"
    assert _fit(shard_dir, root, again, 0, "--ckpt_path", "last") == 0
    assert not list(folder.glob(".*.tmp"))  # the resumed run removed what the kill left
    step = torch.load(folder / "last.ckpt", weights_only=False)["global_step"]
    assert step == torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt")["global_step"]
    resumed = _steps(again)
    assert sorted(resumed) == [2, 3, 4, 5]  # from the checkpoint's step 2, none repeated
    assert resumed == {step: _steps(whole)[step] for step in range(2, 6)}
