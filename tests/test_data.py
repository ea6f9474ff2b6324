"""trainer.data: exact tokens, whole-chunk delivery, eval coverage, determinism, exact resume."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import CHUNK
from torch.utils.data import DataLoader

from pipeline import audio
from pipeline.codec import get_codec, int16_to_pcm16
from pipeline.errors import UserError
from pipeline.records import AudioIndex, Manifest
from trainer.data import SeedStereoDataModule, ShardDataModule
from trainer.data.batch import IGNORE, tokenize
from trainer.data.datamodule import ShardLoader
from trainer.data.seed_style import StereoWavChunkDataset
from trainer.data.shards import DECODED, iter_chunks
from trainer.data.windows import cover, eval_windows

SEQ = 1024


def _module(shard_dir, **kw) -> ShardDataModule:
    options = dict(seq_len=SEQ, batch_size=4, num_workers=0, shuffle_buffer=16, seed=3)
    return ShardDataModule(str(shard_dir), **{**options, **kw})


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"])
        and torch.equal(x["labels"], y["labels"])
        and torch.equal(x["direction"], y["direction"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("codec", ["pcm16", "mulaw8", "linear12"])
def test_tokens_equal_the_codec_of_the_source_audio(tree, shard_dir, codec):
    dm = _module(shard_dir, codec=codec, return_meta=True, direction="random")
    c = get_codec(codec)
    root = AudioIndex.load(tree.index).root
    for raw in _take(dm.train_stream().batches(0, 0, 0), 6):
        batch = tokenize(raw, c)
        for row in range(len(batch["direction"])):
            source, start = batch["source"][row], int(batch["start"][row])
            frames = int16_to_pcm16(audio.read(f"{root}/{source}", start, SEQ))
            d = int(batch["direction"][row])
            np.testing.assert_array_equal(batch["input_ids"][row].numpy(), c.encode(frames[d]))
            np.testing.assert_array_equal(batch["labels"][row].numpy(), c.encode(frames[1 - d]))


def test_every_window_of_every_chunk_visit_is_delivered_once(shard_dir):
    dm = _module(shard_dir, return_meta=True, batch_size=1)
    stream = dm.train_stream()
    windows = stream._windows(0)
    groups = [windows.group(0, number) for number in range(3)]
    expected = Counter()
    chunks = stream.split.chunks(windows.shard_order(0), 0, want_meta=True)
    for group in groups:
        for offset, count in zip(group.offsets, group.counts, strict=True):
            _, (source, chunk_start) = next(chunks)
            expected.update((source, chunk_start + offset + i * SEQ) for i in range(count))
    n = sum(len(g.order) for g in groups)
    got = Counter(b["meta"][0] for b in _take(stream.batches(0, 0, 0), n))
    assert got == expected
    assert all(c in (CHUNK // SEQ, CHUNK // SEQ - 1) for b in groups for c in b.counts)


def test_consecutive_rows_rarely_share_a_chunk(shard_dir):
    dm = _module(shard_dir, return_meta=True, batch_size=4, shuffle_buffer=128)
    batches = _take(dm.train_stream().batches(0, 0, 0), 60)
    clean = 0
    for b in batches:
        chunks = [(s, t // CHUNK) for s, t in b["meta"]]
        clean += all(x != y for x, y in itertools.pairwise(chunks))
    assert clean > 0.5 * len(batches)  # "most"; resampling revisits chunks of this tiny set


def test_eval_covers_every_chunk_once_over_two_ranks_two_workers(shard_dir):
    manifest = Manifest.load(shard_dir)
    sizes = [s.samples for s in manifest.shards["test"]]
    assert len(sizes) >= 2 and len(set(sizes)) >= 2  # unequal shards
    dm = _module(shard_dir, return_meta=True, num_workers=2, batch_size=3)
    seen = Counter()
    counts = []
    for rank in range(2):
        stream = dm.eval_stream("test", rank=rank, world_size=2)
        batches = list(ShardLoader(stream, "pcm16", num_workers=2))
        counts.append(len(batches))
        assert len(batches) == len(stream)
        for b in batches:
            for row in range(len(b["direction"])):
                kept = (b["labels"][row] != IGNORE).numpy()
                for t in np.flatnonzero(kept):
                    seen[(b["source"][row], int(b["start"][row]) + int(t))] += 1
    assert counts[0] == counts[1]
    samples = {}
    for info in manifest.shards["test"]:
        for name, raw in iter_chunks(f"{shard_dir}/{info.path}", want_meta=True):
            samples[raw] = name
    expected = {(src, start + t) for src, start in samples for t in range(CHUNK)}
    assert set(seen) == expected and set(seen.values()) == {1}


def test_eval_windows_score_every_frame_once():
    starts, mask = eval_windows(4096, 1000)
    covered = Counter()
    for s, m in zip(starts, mask, strict=True):
        covered.update(int(s) + np.flatnonzero(m))
    assert sorted(covered) == list(range(4096)) and set(covered.values()) == {1}


@pytest.mark.parametrize(("frames", "length"), [(4096, 1000), (4000, 1000), (999, 1000), (1, 1)])
def test_cover_keeps_every_frame_once_and_every_window_whole(frames, length):
    windows = cover(frames, length)
    kept = [t for s, k in windows for t in range(s + k, min(s + length, frames))]
    assert kept == list(range(frames))
    assert all(s >= 0 and (s + length <= frames or frames < length) for s, _ in windows)
    assert [w.start for w in windows][:-1] == list(range(0, length * (len(windows) - 1), length))


def test_same_seed_same_batches_next_epoch_differs(shard_dir):
    def epoch_batches(epoch, seed=3):
        dm = _module(shard_dir, num_workers=2, seed=seed)
        loader = ShardLoader(dm.train_stream(), "pcm16", lambda: (epoch, 0), num_workers=2)
        return _take(loader, 6)

    first = epoch_batches(0)
    assert _same(first, epoch_batches(0))
    assert not _same(first, epoch_batches(1))
    assert not _same(first, epoch_batches(0, seed=4))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_uninterrupted_batches(shard_dir, workers):
    dm = _module(shard_dir, num_workers=workers, batches_per_epoch=40)
    stream = dm.train_stream()
    whole = list(ShardLoader(stream, "pcm16", lambda: (1, 0), num_workers=workers))
    assert len(whole) == 40
    for start in (1, 7, 23):
        resumed = list(ShardLoader(stream, "pcm16", lambda s=start: (1, s), num_workers=workers))
        assert _same(resumed, whole[start:])


def test_resume_decodes_no_skipped_sample(shard_dir):
    dm = _module(shard_dir, batch_size=2, shuffle_buffer=8, batches_per_epoch=400)
    stream = dm.train_stream()
    group_windows = len(stream._windows(0).group(0, 0).order)
    DECODED["samples"] = 0
    next(iter(stream.batches(0, 0, 300)))
    assert DECODED["samples"] <= stream.group_chunks  # one shuffle group, not 300 batches
    assert 3 * group_windows < 300 * 2


def test_seq_len_above_chunk_and_bad_direction_are_clear_errors(shard_dir):
    with pytest.raises(UserError, match="larger than the shards' chunk"):
        _module(shard_dir, seq_len=CHUNK + 1)
    with pytest.raises(UserError, match="l2r, r2l or random"):
        _module(shard_dir, direction="L->R")


def test_missing_manifest_and_empty_split_are_clear_errors(shard_dir, tmp_path):
    with pytest.raises(UserError, match="no shard manifest here"):
        ShardDataModule(str(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    m = Manifest.load(copy)
    m.shards["val"] = []
    m.save(copy / "manifest.json")
    with pytest.raises(
        UserError, match=r"the val split holds no shards; re-shard with a larger --val \(now 0.3\)"
    ):
        _module(copy).val_dataloader()


def test_a_shard_with_a_pickle_member_is_refused(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    info = Manifest.load(copy).shards["train"][0]
    with tarfile.open(copy / info.path, "a") as tar:
        member = tarfile.TarInfo("zz_000001.pkl")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"\x80\x04K."))
    with pytest.raises(UserError, match="refuses other members"):
        list(iter_chunks(str(copy / info.path)))


def test_seed_style_dataset_is_the_original_design(tree):
    lengths = {
        f"{tree.root}/{rel}": e.frames for rel, e in AudioIndex.load(tree.index).files.items()
    }
    ds = StereoWavChunkDataset(lengths, SEQ, items=400, seed=1)
    item = ds[0]
    assert item["input_ids"].shape == (SEQ,) and item["labels"].dtype == torch.int64
    directions = [int(ds[i]["direction"]) for i in range(400)]
    assert 150 < sum(directions) < 250
    assert torch.equal(ds[5]["input_ids"], ds[5]["input_ids"])
    loader = DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "direction"}
    assert batch["input_ids"].shape == (4, SEQ)
    dm = SeedStereoDataModule(
        root=str(tree.root), seq_len=SEQ, batch_size=2, num_workers=0, items_per_epoch=20
    )
    assert sum(len(v) for v in dm.splits.values()) == len(lengths)
    assert next(iter(dm.train_dataloader()))["labels"].shape == (2, SEQ)


def test_file_and_pipe_urls_give_the_same_batches(shard_dir):
    local = _take(_module(shard_dir).train_dataloader(), 5)
    for prefix in (f"file:{shard_dir}", f"pipe:cat {shard_dir}"):
        other = _take(_module(shard_dir, url_prefix=prefix).train_dataloader(), 5)
        assert _same(local, other)


def test_persistent_workers_follow_the_epoch(shard_dir):
    epoch = {"now": 0}
    dm = _module(shard_dir, num_workers=2, batches_per_epoch=8)
    stream = dm.train_stream()
    persistent = ShardLoader(
        stream, "pcm16", lambda: (epoch["now"], 0), num_workers=2, persistent_workers=True
    )
    first = list(persistent)
    epoch["now"] = 1
    second = list(persistent)
    fresh = [list(ShardLoader(stream, "pcm16", lambda e=e: (e, 0), num_workers=2)) for e in (0, 1)]
    assert _same(first, fresh[0]) and _same(second, fresh[1]) and not _same(first, second)


def test_continuation_labels_are_the_frames_right_after_the_input(tree, shard_dir):
    dm = _module(
        shard_dir,
        seq_len=512,
        task="continuation",
        target_len=256,
        return_meta=True,
        direction="random",
    )
    c = get_codec("pcm16")
    root = AudioIndex.load(tree.index).root
    for raw in _take(dm.train_stream().batches(0, 0, 0), 4):
        batch = tokenize(raw, c)
        assert batch["input_ids"].shape == (4, 512) and batch["labels"].shape == (4, 256)
        for row in range(4):
            source, start = batch["source"][row], int(batch["start"][row])
            channel = int(batch["direction"][row])  # l2r continues the left channel
            frames = int16_to_pcm16(audio.read(f"{root}/{source}", start, 768))[channel]
            np.testing.assert_array_equal(batch["input_ids"][row].numpy(), frames[:512])
            np.testing.assert_array_equal(batch["labels"][row].numpy(), frames[512:])
    val = next(iter(dm.val_dataloader()))
    assert val["labels"].shape[1] == 256 and val["input_ids"].shape[1] == 512


def test_a_task_that_does_not_fit_the_chunk_is_a_clear_error(shard_dir):
    with pytest.raises(UserError, match=r"seq_len 4000 \+ target_len is larger"):
        _module(shard_dir, seq_len=4000, task="continuation", target_len=200)
    with pytest.raises(UserError, match="task 'denoise"):
        _module(shard_dir, task="denoise-everything")


def test_a_set_stored_with_the_old_window_key_loads_and_trains(shard_dir):
    config = json.loads((shard_dir / "manifest.json").read_text())["config"]
    assert config["window"] == 4 and "interleave" not in config  # as before the rename
    batch = next(iter(_module(shard_dir, batch_size=2).train_dataloader()))
    assert batch["input_ids"].shape == (2, SEQ)


def test_the_datamodule_tells_its_shards_sample_rate(shard_dir):
    data = ShardDataModule(str(shard_dir), seq_len=256, num_workers=0)
    assert data.sample_rate == Manifest.load(shard_dir).config.sample_rate == 16000
