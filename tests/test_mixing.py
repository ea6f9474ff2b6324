"""Weighted mixing of shard sets (trainer/data/mixing.py): windows per set follow the weights in
every prefix of the epoch, deterministically; a list of one set is the set alone; a mixed epoch
resumes exactly, under another worker count too; sets sharded differently and a resume under
another mixture are refused in one line; validation and test report each set and the pooled
sums."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from conftest import RATE, SHARD_OPTIONS, TINY_MODEL
from test_data import SEQ, _same, _take
from test_elastic import _rows

from pipeline.errors import UserError
from pipeline.index import build_index
from pipeline.shard import write_shards
from pipeline.synth import make_corpus
from trainer.cli import main as cli_main
from trainer.data import ShardDataModule
from trainer.data.batch import IGNORE
from trainer.model import StereoT5

GROUP = 16  # windows of one shuffle group: the tests' shuffle_buffer


@pytest.fixture(scope="module")
def other_set(tmp_path_factory) -> Path:
    """A second set, sharded like the fixture set from other audio."""
    root = tmp_path_factory.mktemp("other")
    make_corpus(root / "music", tracks=4, seconds=1.0, seed=1, sample_rate=RATE)
    build_index(root / "music", root / "index.json", jobs=1, progress=False)
    write_shards(root / "index.json", root / "set", jobs=1, progress=False, **SHARD_OPTIONS)
    return root / "set"


def _module(manifest: Path | list[dict], **kw) -> ShardDataModule:
    """test_data's datamodule options, over one set's folder or a list of entries."""
    options = dict(seq_len=SEQ, batch_size=4, num_workers=0, shuffle_buffer=GROUP, seed=3)
    return ShardDataModule(
        manifest if isinstance(manifest, list) else str(manifest), **{**options, **kw}
    )


def _mixed(first: Path, second: Path, weights=(3, 1), **kw) -> ShardDataModule:
    entries = [
        {"path": str(path), "weight": w} for path, w in zip((first, second), weights, strict=True)
    ]
    return _module(entries, **kw)


def _sets(windows, count: int) -> list[int]:
    """The set of each of the first `count` windows of V."""
    return [windows.locate(window)[0][0] for window in range(count)]


@pytest.mark.parametrize("weights", [(3, 1), (1, 1), (1, 2)])
def test_windows_per_set_follow_the_weights_in_every_prefix(shard_dir, other_set, weights):
    dm = _mixed(shard_dir, other_set, weights, batches_per_epoch=200)
    stream = dm.train_stream()
    epoch = stream.batches_per_epoch * stream.batch_size
    share = weights[0] / sum(weights)
    first, worst = 0, 0.0
    for n, source in enumerate(_sets(stream._windows(0), epoch), 1):
        first += source == 0
        worst = max(worst, abs(first - n * share))
    assert worst <= GROUP  # every prefix within one group (independent draws wander by several)
    assert first / epoch == pytest.approx(share, abs=0.02)
    assert epoch * min(share, 1 - share) > 3 * GROUP  # both sets cycle: the bound is not empty


def test_the_mixture_is_seeded(shard_dir, other_set):
    def sets(seed: int, epoch: int) -> list[int]:
        return _sets(_mixed(shard_dir, other_set, seed=seed).train_stream()._windows(epoch), 400)

    assert sets(3, 0) == sets(3, 0)
    assert sets(3, 0) != sets(4, 0)
    assert sets(3, 0) != sets(3, 1)


def test_a_list_of_one_set_is_the_set_alone(shard_dir):
    plain, listed = _module(shard_dir), _module([{"path": str(shard_dir)}])
    assert _same(_take(plain.train_dataloader(), 8), _take(listed.train_dataloader(), 8))
    assert not isinstance(listed.val_dataloader(), list)
    assert _same(list(plain.val_dataloader()), list(listed.val_dataloader()))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mixed_epoch_resumes_with_the_uninterrupted_batches(shard_dir, other_set, workers):
    stream = _mixed(shard_dir, other_set, num_workers=workers, batches_per_epoch=30).train_stream()
    whole = _loaded(stream, workers, 0)
    assert len(whole) == 30
    for start in (1, 7, 23):
        assert _same(_loaded(stream, workers, start), whole[start:])


def _loaded(stream, workers: int, start: int) -> list[dict]:
    from trainer.data.datamodule import ShardLoader

    return list(ShardLoader(stream, "pcm16", lambda: (1, start), num_workers=workers))


EPOCH = 18  # global steps: both sets cycle within it


def _steps(dm: ShardDataModule, start: int, stop: int, state: dict | None) -> tuple[list, dict]:
    """The windows of steps [start, stop) from the datamodule's train loader, resumed from
    `state`, and the loader state a checkpoint at `stop` holds."""
    where = [0, start]
    dm._where = lambda: tuple(where)  # the trainer's progress
    loader = dm.train_dataloader()
    if state is not None:
        loader.load_state_dict(state)
    rows = _rows(_take(loader, stop - start))
    where[1] = stop
    return rows, loader.state_dict()


def test_a_mixed_epoch_resumed_under_other_workers_takes_each_window_once(shard_dir, other_set):
    def data(workers: int) -> ShardDataModule:
        return _mixed(
            shard_dir, other_set, num_workers=workers, batches_per_epoch=EPOCH, return_meta=True
        )

    whole, _ = _steps(data(0), 0, EPOCH, None)
    got, state = [], None
    for workers, start, stop in ((0, 0, 5), (2, 5, 11), (0, 11, EPOCH)):
        rows, state = _steps(data(workers), start, stop, state)
        got += rows
    assert Counter(got) == Counter(whole)
    assert state["sets"] == [
        [str(shard_dir / "manifest.json"), 3.0],
        [str(other_set / "manifest.json"), 1.0],
    ]


def test_a_resume_under_another_mixture_is_refused(shard_dir, other_set):
    _, state = _steps(_mixed(shard_dir, other_set, return_meta=True), 0, 3, None)
    with pytest.raises(UserError, match=r"x3, .* x1, this run mixes .* x1, .* x1; resume with"):
        _steps(_mixed(shard_dir, other_set, (1, 1), return_meta=True), 3, 4, state)
    _, plain = _steps(_module(shard_dir, return_meta=True), 0, 3, None)
    with pytest.raises(UserError, match=r"trained on the shard sets .* x1, this run mixes"):
        _steps(_mixed(shard_dir, other_set, return_meta=True), 3, 4, plain)


@pytest.mark.parametrize(("key", "value"), [("sample_rate", 48000), ("chunk_frames", 8192)])
def test_sets_sharded_differently_are_refused_in_one_line(shard_dir, tmp_path, key, value):
    data = json.loads((shard_dir / "manifest.json").read_text())
    mine = data["config"][key]
    data["config"][key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as caught:
        _mixed(shard_dir, tmp_path)
    assert str(caught.value) == (
        f"shard sets {shard_dir} and {tmp_path} differ in {key} ({mine} vs {value}); mix only "
        "sets sharded alike"
    )


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "name at least one shard set"),
        ([{"path": "x", "weight": 0}], "weight must be a number > 0"),
        ([{"path": "x", "wieght": 2}], r"use \{path: SET, weight: W\}"),
    ],
)
def test_bad_manifest_entries_are_clear_errors(entries, message):
    with pytest.raises(UserError, match=message):
        _module(entries)


def test_the_cli_takes_the_list_form(capsys):
    mixture = "[{path: shards/a, weight: 3}, {path: shards/b, weight: 1}]"
    with pytest.raises(SystemExit):
        cli_main(["fit", "--data", "trainer.data.ShardDataModule", "--data.init_args.manifest",
                  mixture, "--print_config"])  # fmt: skip
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["manifest"] == [
        {"path": "shards/a", "weight": 3},
        {"path": "shards/b", "weight": 1},
    ]


CODEC, EVAL_SEQ = "mulaw8", 256  # 256 levels and short windows: a fast full head


def _scored(dm: ShardDataModule, split: str) -> int:
    """Scored target samples of one set's split (its only loader)."""
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    return sum(int((batch["labels"] != IGNORE).sum()) for batch in loader)


def _run(dm: ShardDataModule, stage: str, root: Path) -> dict[str, float]:
    """The logged metrics of `trainer.validate` or `trainer.test` with a fixed tiny model."""
    pl.seed_everything(0)
    model = StereoT5(**TINY_MODEL, codec=CODEC, max_len=EVAL_SEQ, head="full")
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers advice
        getattr(trainer, stage)(model, datamodule=dm, verbose=False)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@pytest.mark.parametrize(("stage", "split"), [("validate", "val"), ("test", "test")])
def test_eval_reports_each_set_and_the_pooled_sums(shard_dir, other_set, tmp_path, stage, split):
    options = dict(codec=CODEC, seq_len=EVAL_SEQ, eval_batch_size=16)
    mixed = _run(_mixed(shard_dir, other_set, **options), stage, tmp_path)
    alone = [_run(_module(path, **options), stage, tmp_path) for path in (shard_dir, other_set)]
    counts = [_scored(_module(path, **options), split) for path in (shard_dir, other_set)]
    assert not [name for name in alone[0] if name.count("/") > 1]  # one set: names as before
    names = [shard_dir.name, other_set.name]
    bits = f"{split}/bits_per_sample"
    for name, own in zip(names, alone, strict=True):
        for metric, value in own.items():
            assert mixed[metric.replace(f"{split}/", f"{split}/{name}/")] == value, metric
    pooled = sum(own[bits] * n for own, n in zip(alone, counts, strict=True)) / sum(counts)
    assert mixed[bits] == pytest.approx(pooled, rel=1e-6)
    if split == "test":  # 7 chunks and 3: the pooled value is no mean of the sets' values
        assert mixed[bits] != pytest.approx(sum(own[bits] for own in alone) / 2, rel=1e-4)
