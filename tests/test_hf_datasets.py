"""Hugging Face `datasets` reads a shard set as our reader does: every sample of every split, the
chunk bit for bit and its metadata, in manifest order, streaming or not (docs/formats.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from pipeline.records import Manifest  # noqa: E402
from tests.conftest import CHUNK  # noqa: E402
from trainer.data.batch import DataError  # noqa: E402
from trainer.data.hf import load_shard_set  # noqa: E402
from trainer.data.shards import iter_chunks  # noqa: E402

SPLITS = ("train", "val", "test")


def reference(shard_dir: Path, split: str) -> list[tuple[str, np.ndarray, tuple[str, int]]]:
    """(shard path, chunk, (source, start)) per sample, as `iter_chunks` reads the split."""
    rows = []
    for info in Manifest.load(shard_dir).shards[split]:
        url = str((shard_dir / info.path).resolve())
        for chunk, meta in iter_chunks(url, want_meta=True, expected=info.samples):
            rows.append((url, chunk, meta))
    return rows


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
@pytest.mark.parametrize("split", SPLITS)
def test_load_shard_set_yields_what_our_reader_does(shard_dir, tmp_path, split, streaming):
    expected = reference(shard_dir, split)
    loaded = load_shard_set(shard_dir, split, streaming=streaming, cache_dir=tmp_path)
    samples = list(loaded)
    assert len(samples) == len(expected) > 0
    for sample, (url, chunk, (source, start)) in zip(samples, expected, strict=True):
        assert isinstance(sample["npy"], np.ndarray)
        assert sample["npy"].dtype == np.uint16 and sample["npy"].shape == (2, CHUNK)
        np.testing.assert_array_equal(sample["npy"], chunk)
        assert (sample["json"]["source"], sample["json"]["start"], sample["json"]["split"]) == (
            source,
            start,
            split,
        )
        assert sample["__url__"] == url
    if not streaming:  # converted under tmp_path, not the user's cache
        assert all(Path(f["filename"]).is_relative_to(tmp_path) for f in loaded.cache_files)


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
def test_plain_builder_widens_to_int64_and_keeps_the_values(shard_dir, tmp_path, streaming):
    """The one-liner in the docs, without our helper: values intact, the dtype widened."""
    expected = reference(shard_dir, "train")
    loaded = datasets.load_dataset(
        "webdataset",
        data_files={"train": str(shard_dir / "train" / "*.tar")},
        split="train",
        streaming=streaming,
        cache_dir=str(tmp_path),
    )
    samples = list(loaded.with_format("numpy"))
    assert len(samples) == len(expected)
    for sample, (_, chunk, (source, start)) in zip(samples, expected, strict=True):
        assert sample["npy"].dtype == np.int64
        np.testing.assert_array_equal(np.asarray(sample["npy"], dtype=np.uint16), chunk)
        assert (sample["json"]["source"], int(sample["json"]["start"])) == (source, start)


def test_a_split_without_shards_is_a_clear_error(shard_dir, tmp_path):
    with pytest.raises(DataError, match=r"holdout split holds no shards .*test, train, val"):
        load_shard_set(shard_dir, "holdout", cache_dir=tmp_path)


def test_a_missing_shard_is_named(shard_dir, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(shard_dir, copy)
    gone = copy / Manifest.load(copy).shards["val"][0].path
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone.name}: the shard is missing; .*pipeline verify"):
        load_shard_set(copy, "val", cache_dir=tmp_path / "cache")
