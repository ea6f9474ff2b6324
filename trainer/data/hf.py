"""One split of a shard set as a Hugging Face `datasets` dataset, read by its webdataset builder.

The shards a split holds come from the manifest, in its order (the order `iter_chunks` reads them
in), never from a glob, so a stray tar in the folder is not read. The features are given, not
inferred from the first samples: `npy` is a uint16 `Array2D((2, chunk_frames))`, and every
sample comes back as a uint16 `[2, C]` ndarray (the builder's default formats give nested lists
or int64 arrays; see docs/formats.md). `datasets` is the `hf` extra: it is imported here only.
"""

from __future__ import annotations

import typing
from pathlib import Path

import datasets
import numpy as np

from pipeline.records import ChunkMeta, Manifest
from trainer.data.batch import DataError

__all__ = ["chunk_features", "load_shard_set"]

# Arrow types of the `KEY.json` fields, by their Python type in `ChunkMeta`.
_META_TYPES = {str: "string", int: "int64"}


def chunk_features(chunk_frames: int) -> datasets.Features:
    """The columns the webdataset builder yields for one sample of a shard set."""
    meta = {
        name: datasets.Value(_META_TYPES[hint])
        for name, hint in sorted(typing.get_type_hints(ChunkMeta).items())
    }
    return datasets.Features(
        {
            "npy": datasets.Array2D((2, chunk_frames), "uint16"),
            "json": meta,
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
        }
    )


def shard_files(folder: Path, manifest: Manifest, split: str) -> list[str]:
    """The split's non-empty shards as absolute paths, in manifest order; each must exist."""
    files = [str((folder / s.path).resolve()) for s in manifest.shards.get(split, []) if s.samples]
    if not files:
        held = ", ".join(name for name, shards in sorted(manifest.shards.items()) if shards)
        raise DataError(
            f"{folder}: the {split} split holds no shards (splits with shards: {held or 'none'}); "
            "pick one of those or re-shard"
        )
    missing = [path for path in files if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: the shard is missing; check the set with `python -m pipeline verify "
            f"{folder}` and re-create what it names"
        )
    return files


def load_shard_set(
    folder: str | Path, split: str, streaming: bool = False, cache_dir: str | Path | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """`split` of the shard set in `folder`: per sample `npy` (uint16 `[2, C]` ndarray), `json`
    (the chunk's `ChunkMeta` as a dict), `__key__` and `__url__`.

    `streaming=False` converts the split once into an Arrow file under `cache_dir` (default:
    the `datasets` cache), stored as uint16; `streaming=True` reads the tars as it iterates.
    """
    folder = Path(folder)
    manifest = Manifest.load(folder)
    loaded = datasets.load_dataset(
        "webdataset",
        data_files={split: shard_files(folder, manifest, split)},
        split=split,
        features=chunk_features(manifest.config.chunk_frames),
        streaming=streaming,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    if streaming:  # rows come back as the builder decoded them: uint16 arrays
        return loaded
    # The numpy format widens integers to int64 unless told the dtype; only `npy` is formatted,
    # so the metadata stays plain Python values.
    return loaded.with_format("numpy", columns=["npy"], dtype=np.uint16, output_all_columns=True)
