"""`fit` under faults: `kill -9` while a checkpoint is being written leaves the last whole
checkpoint loadable and the partial one under no final name, and `--ckpt_path last` goes on
with the batches the uninterrupted run saw; a checkpoint the disk refuses is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from test_cli_train import REPO, _args
from test_io_faults import _file_size_limit

# The lines of a script that add its `Recorder` callback to the `python -m trainer` run in it.
WITH_RECORDER = """
defaults = cli.trainer_defaults
def with_recorder():
    options = defaults()
    options["callbacks"].append(Recorder())
    return options
cli.trainer_defaults = with_recorder
"""

# Runs `python -m trainer fit` with a callback that appends each step's batch digest to
# RECORD; with KILL_AT_SAVE=N the N-th last.ckpt written stops half-way with SIGKILL.
_SCRIPT = (
    """
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

"""
    + WITH_RECORDER
    + """

class DyingFile(io.FileIO):  # the N-th checkpoint file written stops half-way: SIGKILL
    def write(self, data):
        view = memoryview(data)
        super().write(view[: len(view) // 2])
        self.flush()
        os.kill(os.getpid(), signal.SIGKILL)

saves = [0]
def checkpoint_open(path, mode="r", *args, **kw):
    last = ".last.ckpt." in str(path)  # the temporary file of a last.ckpt
    saves[0] += last
    return DyingFile(path, "wb") if last and saves[0] == kill_at else open(path, mode, *args, **kw)
cli.open = checkpoint_open  # trainer.cli's own `open`: SafeCheckpointIO's writes

cli.main(sys.argv[2:])
"""
)


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
    # last.ckpt is written at every validation: at step 2, then at step 4, killed half-way;
    # the resumed run goes from step 2 over the epoch's end at step 4 on to step 6
    assert _fit(shard_dir, root, cut, kill_at=2) == -signal.SIGKILL
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


def test_a_checkpoint_over_the_file_size_limit_stops_fit_in_one_line(shard_dir, tmp_path):
    args = _args(shard_dir, tmp_path, "--trainer.logger", "false")
    done = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        preexec_fn=_file_size_limit(1_000_000),  # the tiny model's checkpoint is larger
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path}/checkpoints/" in errors[0] and "file size limit" in errors[0]
    assert not list((tmp_path / "checkpoints").iterdir())  # no checkpoint, no temporary file
