"""The elastic epoch: one multiset and order of training windows for any number of ranks and
workers, and a run resumed on another number of either consumes what is left, each window
exactly once (trainer/data/epoch.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_data import _module
from test_fit_faults import WITH_RECORDER
from test_train_loop import _free_port

from pipeline.errors import UserError
from trainer.data.datamodule import ShardLoader

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4


def _rows(batches: list[dict]) -> list[tuple[str, int, int]]:
    return [
        (source, int(start), int(direction))
        for batch in batches
        for source, start, direction in zip(
            batch["source"], batch["start"], batch["direction"], strict=True
        )
    ]


def _steps(shard_dir, ranks: int, workers: int, start: int, stop: int, resumed=None):
    """The windows of global steps [start, stop) over `ranks` ranks of `workers` workers each,
    and the loader state a checkpoint at `stop` holds."""
    rows, state = [], None
    for rank in range(ranks):
        dm = _module(
            shard_dir, num_workers=workers, global_batch_size=GLOBAL_BATCH, shuffle_buffer=16,
            batches_per_epoch=EPOCH, return_meta=True,
        )  # fmt: skip
        where = [0, start]
        loader = ShardLoader(
            dm.train_stream(rank, ranks), "pcm16", lambda where=where: tuple(where),
            num_workers=workers,
        )  # fmt: skip
        if resumed is not None:
            loader.load_state_dict(resumed)
        taken = []
        for batch in loader:
            taken.append(batch)
            if len(taken) == stop - start:
                break
        rows += _rows(taken)
        where[1] = stop
        state = loader.state_dict()
    return rows, state


EPOCH = 18  # global steps: whole rounds of some layouts below and a partial last one, in one cycle


@pytest.mark.parametrize(
    "layouts", [((2, 0), (1, 2), (4, 0)), ((1, 0), (2, 2), (1, 0)), ((4, 2), (2, 0), (1, 2))]
)
def test_an_epoch_resumed_on_other_ranks_and_workers_takes_each_window_once(shard_dir, layouts):
    whole, _ = _steps(shard_dir, 1, 0, 0, EPOCH)
    assert len(whole) == EPOCH * GLOBAL_BATCH
    cuts = [0, 5, 11, EPOCH]
    got, state = [], None
    for (ranks, workers), start, stop in zip(layouts, cuts, cuts[1:], strict=False):
        rows, state = _steps(shard_dir, ranks, workers, start, stop, state)
        got += rows
    assert Counter(got) == Counter(whole)
    assert len(set(got)) == len(got)  # each window once (one cycle of the set holds them)


def test_workers_do_not_change_the_epoch(shard_dir):
    zero, _ = _steps(shard_dir, 1, 0, 0, EPOCH)
    two, _ = _steps(shard_dir, 1, 2, 0, EPOCH)
    assert Counter(zero) == Counter(two)


def test_a_resume_under_another_global_batch_is_refused(shard_dir):
    _, state = _steps(shard_dir, 2, 0, 0, 5)
    dm = _module(shard_dir, batch_size=GLOBAL_BATCH)  # 1 rank: global batch 4, now 8 asked
    stream = dm.train_stream(0, 2)
    loader = ShardLoader(stream, "pcm16", lambda: (0, 5))
    with pytest.raises(UserError, match="global batch of 4 windows, this run has 8"):
        loader.load_state_dict(state)
    with pytest.raises(UserError, match="global_batch_size 5 does not split over 2 ranks"):
        _module(shard_dir, global_batch_size=5).train_stream(0, 2)


# Runs `python -m trainer fit` recording each rank's training windows in RECORD.<rank>.
_SCRIPT = (
    """
import json, sys
import pytorch_lightning as pl
import trainer.cli as cli

record = sys.argv[1]

class Recorder(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = [[s, int(t), int(d)] for s, t, d in zip(batch["source"], batch["start"],
                                                       batch["direction"])]
        with open(f"{record}.{trainer.global_rank}", "a") as f:
            f.write(json.dumps(rows) + "\\n")

"""
    + WITH_RECORDER
    + """
cli.main(sys.argv[2:])
"""
)


def _fit(shard_dir, root: Path, record: Path, devices: int, steps: int, *extra: str) -> None:
    script = root.parent / "fit_recorded.py"
    script.write_text(_SCRIPT)
    options = {
        "--model.d_model": "32", "--model.d_ff": "64", "--model.num_layers": "1",
        "--model.num_decoder_layers": "1", "--model.num_heads": "2", "--model.d_kv": "16",
        "--model.head": "coarse_fine", "--data": "trainer.data.ShardDataModule",
        "--data.manifest": str(shard_dir), "--data.seq_len": "512",
        "--data.global_batch_size": str(GLOBAL_BATCH), "--data.num_workers": "0",
        "--data.batches_per_epoch": "8", "--data.return_meta": "true",
        "--trainer.accelerator": "cpu", "--trainer.devices": str(devices),
        "--trainer.strategy": "ddp" if devices > 1 else "auto",
        "--trainer.max_steps": str(steps), "--trainer.val_check_interval": "4",
        "--trainer.limit_val_batches": "1", "--trainer.num_sanity_val_steps": "0",
        "--trainer.default_root_dir": str(root), "--trainer.enable_progress_bar": "false",
        "--trainer.logger": "false",
    }  # fmt: skip
    args = [item for pair in options.items() for item in pair]
    env = {
        **os.environ,
        "MASTER_PORT": str(_free_port()),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, str(script), str(record), "fit", *args, *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _recorded(record: Path) -> list[tuple]:
    return [
        tuple(row)
        for path in sorted(record.parent.glob(record.name + ".*"))
        for line in path.read_text().splitlines()
        for row in json.loads(line)
    ]


@pytest.fixture(scope="module")
def uninterrupted(shard_dir, tmp_path_factory) -> list[tuple]:
    """The windows of an uninterrupted 1-rank run of the 8 steps."""
    record = tmp_path_factory.mktemp("whole") / "rows"
    _fit(shard_dir, record.parent, record, 1, 8)
    return _recorded(record)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_ddp_stopped_half_way_and_resumed_on_another_number_of_ranks(
    shard_dir, tmp_path, uninterrupted, first, then
):
    part = tmp_path / "part" / "rows"
    part.parent.mkdir()
    _fit(shard_dir, tmp_path / "part", part, first, 4)
    _fit(shard_dir, tmp_path / "part", part, then, 8, "--ckpt_path", "last")
    got = _recorded(part)
    assert len(uninterrupted) == 8 * GLOBAL_BATCH
    assert Counter(got) == Counter(uninterrupted) and len(set(got)) == len(got)
