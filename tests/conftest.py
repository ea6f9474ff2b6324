"""Fixtures: a tiny audio tree and its shards, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.index import build_index
from pipeline.jobarray import VARIABLES
from pipeline.shard import write_shards
from pipeline.synth import make_corpus

RATE = 16000
CHUNK = 4096
# The smallest StereoT5 body the model tests use; each test adds max_len, head, ...
TINY_MODEL = dict(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16)
# Options of the fixture shard set; tests that re-shard pass the same ones.
SHARD_OPTIONS = dict(chunk_frames=CHUNK, shard_bytes=60_000, seed=0, val=0.3, interleave=4)


@dataclass(frozen=True)
class Tree:
    root: Path
    index: Path


def _extra(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, RATE, subtype="PCM_16")


def make_tree(root: Path) -> Tree:
    """Synthetic MUSDB tree plus mono, 6-channel and partly silent files, indexed."""
    make_corpus(root, tracks=3, seconds=2.0, seed=0, sample_rate=RATE)
    rng = np.random.default_rng(7)
    _extra(root / "extra" / "Mono Song" / "mono.wav", rng.uniform(-0.5, 0.5, 3 * CHUNK + 100))
    _extra(root / "extra" / "Six" / "six.wav", rng.uniform(-0.5, 0.5, (4 * CHUNK + 5, 6)))
    quiet = rng.uniform(-0.5, 0.5, (5 * CHUNK, 2))
    quiet[CHUNK : 3 * CHUNK] = 0.0  # chunks 1 and 2 are digital silence
    _extra(root / "extra" / "Quiet" / "quiet.wav", quiet)
    index = root.parent / f"{root.name}-index.json"
    build_index(root, index, jobs=1, progress=False)
    return Tree(root, index)


@pytest.fixture(scope="session", autouse=True)
def _not_a_job_array_task() -> Iterator[None]:
    """The suite run inside a job array task still shards whole sets: `write_shards` reads
    the task's number from the environment when no partition is given."""
    with pytest.MonkeyPatch.context() as patch:
        for name in VARIABLES:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Tree:
    return make_tree(tmp_path_factory.mktemp("audio") / "music")


@pytest.fixture(scope="session")
def shard_dir(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(tree.index, out, jobs=1, progress=False, **SHARD_OPTIONS)
    return out
