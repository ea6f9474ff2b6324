"""Shards that fail under the loader: one `error:` line naming the shard (workers too), a
stream that ends early or a pipe that fails is an error, remote shards are read again, and
`on_corrupt: skip` goes on without moving any position."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from test_cli_train import _args
from test_data import _module, _same

from pipeline.errors import UserError
from pipeline.records import Manifest
from trainer.cli import main as cli_main
from trainer.data.batch import IGNORE
from trainer.data.datamodule import ShardLoader
from trainer.data.shards import ShardReadError, iter_chunks


@pytest.fixture
def copy(shard_dir, tmp_path) -> Path:
    """A copy of the fixture set to break."""
    out = tmp_path / "set"
    shutil.copytree(shard_dir, out)
    return out


def _train_shard(folder: Path, number: int = 0) -> Path:
    return folder / Manifest.load(folder).shards["train"][number].path


def _member_offsets(path: Path) -> list[int]:
    """Where each member's header starts: a cut there ends the tar cleanly."""
    with tarfile.open(path) as tar:
        return [info.offset for info in tar.getmembers()]


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fit_fails(copy: Path, tmp_path: Path, capfd, *extra: str) -> str:
    args = _args(copy, tmp_path / "run", "--data.init_args.num_workers", "2", *extra)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--trainer.logger", "false", "--trainer.enable_model_summary", "false"])
    assert exit_info.value.code == 2
    return _error_line(capfd.readouterr().err)


def _named_shard(line: str, folder: Path) -> str:
    """The train shard the error line names (every one of them was broken)."""
    names = [s.path for s in Manifest.load(folder).shards["train"] if str(folder / s.path) in line]
    assert len(names) == 1, line
    return names[0]


def test_a_truncated_shard_stops_fit_with_two_workers_in_one_line(copy, tmp_path, capfd):
    for info in Manifest.load(copy).shards["train"]:
        _cut(copy / info.path, (copy / info.path).stat().st_size // 2)
    line = _fit_fails(copy, tmp_path, capfd)
    _named_shard(line, copy)
    assert "unreadable (unexpected end of data)" in line
    assert f"python -m pipeline verify {copy}" in line


def test_a_pickle_member_stops_fit_with_two_workers_in_one_line(copy, tmp_path, capfd):
    for info in Manifest.load(copy).shards["train"]:
        with tarfile.open(copy / info.path, "a") as tar:
            member = tarfile.TarInfo("aa_000000.pkl")
            member.size = 4
            tar.addfile(member, io.BytesIO(b"\x80\x04K."))
    line = _fit_fails(copy, tmp_path, capfd)
    _named_shard(line, copy)
    assert "refuses other members" in line


def test_a_missing_shard_stops_validate_in_one_line(copy, tmp_path, capfd):
    shard = copy / Manifest.load(copy).shards["val"][0].path
    shard.unlink()
    args = _args(copy, tmp_path / "run", "--data.init_args.num_workers", "2")
    with pytest.raises(SystemExit):
        cli_main(["validate", *args[1:], "--trainer.logger", "false"])
    line = _error_line(capfd.readouterr().err)
    assert f"{shard}: the shard is missing" in line


def test_a_cut_on_a_member_boundary_is_an_error_local_and_streamed(copy):
    shard = _train_shard(copy)
    samples = Manifest.load(copy).shards["train"][0].samples
    _cut(shard, _member_offsets(shard)[2])  # sample 0 (.json, .npy) only
    for url in (str(shard), f"pipe:cat {shard}"):
        with pytest.raises(ShardReadError, match=f"ended after 1 of the {samples} samples"):
            list(iter_chunks(url, expected=samples))
    assert len(list(iter_chunks(str(shard)))) == 1  # what tarfile alone gives: no error


def test_a_pipe_that_exits_non_zero_is_an_error_after_every_sample(copy):
    shard = _train_shard(copy)
    samples = Manifest.load(copy).shards["train"][0].samples
    url = f"pipe:cat {shard}; exit 3; :"
    with pytest.raises(ShardReadError, match="its command exited with status 3"):
        list(iter_chunks(url, expected=samples))


def _flaky_prefix(tmp_path: Path, folder: Path, first_bytes: int) -> str:
    """A `pipe:` prefix whose command sends only `first_bytes` of a shard the first time it is
    asked for that shard (and exits 0, as a cut connection may), and all of it afterwards."""
    script = tmp_path / "flaky.sh"
    state = tmp_path / "state"
    state.mkdir()
    script.write_text(
        f'seen="{state}/$(basename "$1")"\n'
        f'if [ ! -e "$seen" ]; then touch "$seen"; head -c {first_bytes} "$1"; exit 0; fi\n'
        'cat "$1"\n'
    )
    return f"pipe:sh {script} {folder}"


def test_a_remote_shard_that_fails_once_is_read_again_and_the_epoch_is_clean(
    shard_dir, tmp_path, capfd
):
    clean = list(_module(shard_dir, batches_per_epoch=10).train_dataloader())
    sample_bytes = _member_offsets(_train_shard(shard_dir))[2]
    prefix = _flaky_prefix(tmp_path, shard_dir, sample_bytes + 700)  # one sample, then a cut
    dm = _module(shard_dir, batches_per_epoch=10, url_prefix=prefix, retry_backoff_s=0.0)
    flaky = list(dm.train_dataloader())
    assert _same(clean, flaky)
    retries = [line for line in capfd.readouterr().err.splitlines() if "retry 1 of 3" in line]
    failed = {line.split(": ")[1] for line in retries}  # the shard each retry names
    assert len(retries) == len(failed) >= 2  # every shard read fails once, logged once
    assert all("reading it again from sample 1" in line for line in retries), retries


def test_a_local_shard_is_not_read_again(copy, capfd):
    shard = _train_shard(copy)
    _cut(shard, shard.stat().st_size // 2)
    stream = _module(copy, batches_per_epoch=20).train_stream()
    with pytest.raises(ShardReadError):
        list(stream.batches(0, 0, 0))
    assert "retry" not in capfd.readouterr().err


def _first_shard_of_stream(folder: Path) -> Path:
    stream = _module(folder).train_stream()
    return Path(stream._windows(0).shard_order(0)[0])


def test_skip_reports_a_corrupt_shard_once_and_a_resume_sees_the_same_batches(
    shard_dir, copy, capfd
):
    corrupt = _first_shard_of_stream(copy)
    _cut(corrupt, _member_offsets(corrupt)[2] + 1000)  # sample 0 whole, then damage
    dm = _module(copy, batches_per_epoch=12, on_corrupt="skip")
    whole = list(ShardLoader(dm.train_stream(), "pcm16", lambda: (0, 0)))
    warnings = [line for line in capfd.readouterr().err.splitlines() if str(corrupt) in line]
    assert len(warnings) == 1 and "(on_corrupt: skip)" in warnings[0]
    clean = list(_module(shard_dir, batches_per_epoch=12).train_dataloader())
    unscored = 0
    for batch, reference in zip(whole, clean, strict=True):
        kept = (batch["labels"] != IGNORE).all(dim=1)
        assert ((batch["labels"] == IGNORE).all(dim=1) | kept).all()  # whole rows only
        assert torch.equal(batch["input_ids"][kept], reference["input_ids"][kept])
        assert torch.equal(batch["labels"][kept], reference["labels"][kept])
        unscored += int((~kept).sum())
    assert unscored > 0  # the windows of the slots left empty, nothing else moved
    for start in (1, 5, 9):
        resumed = list(ShardLoader(dm.train_stream(), "pcm16", lambda s=start: (0, s)))
        assert _same(resumed, whole[start:])
    with pytest.raises(ShardReadError, match=str(corrupt)):  # the default stops there
        list(_module(copy, batches_per_epoch=12).train_dataloader())


def test_skip_in_an_eval_stream_keeps_every_other_chunk_scored(copy):
    shard = copy / Manifest.load(copy).shards["val"][0].path
    _cut(shard, 10)
    dm = _module(copy, on_corrupt="skip")
    batches = list(dm.val_dataloader())
    scored = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    manifest = Manifest.load(copy)
    first = manifest.shards["val"][0].samples
    total = manifest.samples("val")
    assert scored == (total - first) * manifest.config.chunk_frames
    assert len(batches) == len(dm.eval_stream("val"))


def test_bad_read_options_are_clear_errors(shard_dir):
    with pytest.raises(UserError, match="on_corrupt 'ignore': use one of fail, skip"):
        _module(shard_dir, on_corrupt="ignore")
    with pytest.raises(UserError, match="read_retries -1"):
        _module(shard_dir, read_retries=-1)


def test_worker_errors_keep_their_own_message():
    from trainer.data.datamodule import worker_message

    text = (
        "Caught ShardReadError in DataLoader worker process 1.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1, in f\n    raise E\n'
        "trainer.data.shards.ShardReadError: /s/t.tar: unreadable (x); check the set\n"
    )
    cleaned = worker_message(ShardReadError(text))
    assert (
        type(cleaned) is ShardReadError
        and str(cleaned) == "/s/t.tar: unreadable (x); check the set"
    )
    plain = ShardReadError("/s/t.tar: the shard is missing")
    assert worker_message(plain) is plain
