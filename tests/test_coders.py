"""The lossless coders' rows: on exactly the scored samples, as contiguous per-source segments.

The external coders are stand-in scripts put on PATH: each records the WAV it is given and
writes a file of frames x channels bytes, so its cost given the input is exactly 8 bits.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TINY_MODEL

from pipeline.records import Manifest
from trainer.evaluation.baselines import flac_bytes
from trainer.evaluation.coders import measure_coders
from trainer.evaluation.evaluate import evaluate
from trainer.evaluation.segments import Piece, Segment, join_chunks
from trainer.model import StereoT5

RATE = 16000  # the fixture shards' rate
SEQ = 64
# the train split mixes four sources over eight shards, and one of them (Quiet) has a gap:
# its chunks 1 and 2 are digital silence, dropped by the sharder
SPLIT, CHUNKS = "train", 10

FAKE = """#!{python}
import shutil, sys, uuid
from pathlib import Path
import soundfile as sf
args = sys.argv[1:]
if not args or args == ["--version"]:
    print("usage: a banner first", file=sys.stderr)
    print("{banner}")
    sys.exit(1 if not args else 0)
if {fail}:
    print("could not open the file", file=sys.stderr)
    sys.exit(3)
wav = next(a for a in args if a.endswith(".wav"))
shutil.copy(wav, Path({record!r}) / (uuid.uuid4().hex + ".wav"))
info = sf.info(wav)
Path(args[-1]).write_bytes(bytes(info.frames * info.channels))
"""


def _fake(folder: Path, name: str, banner: str, record: Path, fail: bool = False) -> None:
    record.mkdir(parents=True, exist_ok=True)
    path = folder / name
    text = FAKE.format(python=sys.executable, banner=banner, record=str(record), fail=fail)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> Path:
    """wavpack and sac stand-ins, alone on PATH; each records its WAVs under <record>/<name>."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    _fake(bin_dir, "wavpack", "wavpack 9.9.9", record / "wavpack")
    _fake(bin_dir, "sac", "Sac v0.0.1 - a stand-in", record / "sac")
    monkeypatch.setenv("PATH", str(bin_dir))
    return record


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An untrained model: the coders' rows do not depend on what it predicts."""
    torch.manual_seed(0)
    model = StereoT5(codec="pcm16", head="coarse_fine", max_len=256, **TINY_MODEL)
    return model.save_pretrained(tmp_path_factory.mktemp("coders") / "export")


def _segments(shard_dir: Path, split: str, count: int) -> dict[tuple[str, int], np.ndarray]:
    """The first `count` chunks of a split in manifest order, read with tarfile and json alone,
    joined per source where one starts as the one before ends: int16 [2, frames] by (source,
    start)."""
    chunks: dict[str, list[tuple[int, np.ndarray]]] = {}
    taken = 0
    for shard in Manifest.load(shard_dir).shards[split]:
        with tarfile.open(shard_dir / shard.path) as tar:
            members = tar.getmembers()
            by_name = {m.name: m for m in members}
            for member in (m for m in members if m.name.endswith(".npy")):
                if taken == count:
                    break
                u16 = np.load(io.BytesIO(tar.extractfile(member).read()))
                meta = json.loads(tar.extractfile(by_name[member.name[:-4] + ".json"]).read())
                chunk = (u16.astype(np.int32) - 32768).astype(np.int16)
                chunks.setdefault(meta["source"], []).append((meta["start"], chunk))
                taken += 1
    segments: dict[tuple[str, int], np.ndarray] = {}
    for source, found in chunks.items():
        first = end = None
        for start, chunk in sorted(found, key=lambda c: c[0]):
            if start == end:
                segments[source, first] = np.concatenate([segments[source, first], chunk], 1)
            else:
                first, segments[source, start] = start, chunk
            end = start + chunk.shape[1]
    return segments


def _recorded(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The stereo ([2, frames]) and mono ([frames]) WAVs a stand-in was given, as int16."""
    stereo, mono = [], []
    for wav in sorted(folder.glob("*.wav")):
        data, rate = sf.read(wav, dtype="int16", always_2d=True)
        assert rate == RATE
        (stereo if data.shape[1] == 2 else mono).append(
            data.T if data.shape[1] == 2 else data[:, 0]
        )
    return stereo, mono


def _same(found: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    """The same arrays, in any order."""
    key = lambda a: (a.shape, a.tobytes())  # noqa: E731
    return sorted(map(key, found)) == sorted(map(key, expected))


# ------------------------------------------------------------------------------ segments


def _piece(source: str, start: int, value: int, frames: int = 4) -> Piece:
    return Piece(source, start, np.full((2, frames), value, np.uint16))


def test_segments_join_each_sources_chunks_in_order_and_split_at_a_gap():
    pieces = [
        _piece("b", 4, 50),
        _piece("a", 8, 3),  # a's chunks arrive out of order, as shards interleave them
        _piece("a", 0, 1),
        _piece("a", 16, 5),  # a gap after frame 12: a new segment
        _piece("a", 4, 2),
    ]
    segments = join_chunks(pieces)
    assert [(s.source, s.start, s.frames) for s in segments] == [
        ("a", 0, 12),
        ("a", 16, 4),
        ("b", 4, 4),
    ]
    first = segments[0].samples()
    assert first.dtype == np.int16 and first.shape == (2, 12)
    assert (first[0].astype(int) + 32768).tolist() == [1] * 4 + [2] * 4 + [3] * 4


def test_overlapping_chunks_of_one_source_are_refused():
    with pytest.raises(ValueError, match="a: chunks at 0 and 2 overlap"):
        join_chunks([_piece("a", 0, 1), _piece("a", 2, 2)])


# ------------------------------------------------------------------------------ coders


def test_every_coder_codes_exactly_the_scored_samples_per_source(
    export, shard_dir, tmp_path, fakes
):
    report = evaluate(
        export, shard_dir, split=SPLIT, max_chunks=CHUNKS, generate=0, out=tmp_path / "eval",
        seq_len=SEQ, progress=False,
    )  # fmt: skip
    expected = _segments(shard_dir, SPLIT, CHUNKS)
    assert len({source for source, _ in expected}) == 4 and len(expected) == 5  # Quiet: a gap
    assert report.counts.segments == len(expected) and report.counts.chunks == CHUNKS
    for name in ("wavpack", "sac"):
        stereo, mono = _recorded(fakes / name)
        assert _same(stereo, list(expected.values()))  # left, right: as scored
        assert _same(mono, [s[0] for s in expected.values()])  # l2r: the input is left
    frames = {}
    for (source, _), samples in expected.items():
        frames[source] = frames.get(source, 0) + samples.shape[1]
    assert {s.source: s.frames for s in report.per_source} == frames
    assert sum(frames.values()) == report.counts.samples_scored == CHUNKS * 4096
    for row in (report.coders.flac, report.coders.wavpack, report.coders.sac):
        assert row.skipped is None
        assert {source: c.frames for source, c in row.per_source.items()} == frames
        assert row.cost.frames == report.counts.samples_scored
    assert report.coders.wavpack.version == "wavpack 9.9.9"
    assert report.coders.sac.version == "Sac v0.0.1 - a stand-in"
    assert report.coders.wavpack.command == "wavpack -hhx6 -q -y in.wav -o out.wv"
    assert report.coders.sac.command == "sac --encode --normal in.wav out.sac"
    # a stand-in's files are frames x channels bytes: (2 F - F) x 8 / F
    assert (
        report.bits_per_sample.given_input.wavpack == 8.0 == report.bits_per_sample.given_input.sac
    )
    assert all(s.given_input.sac == 8.0 for s in report.per_source)

    # FLAC: the joined segments as one file each, not chunk by chunk
    flac = report.coders.flac.cost
    assert flac.stereo_bytes == sum(flac_bytes(s.T, RATE) for s in expected.values())
    assert flac.input_bytes == sum(flac_bytes(s[0], RATE) for s in expected.values())
    assert flac.target_bytes == sum(flac_bytes(s[1], RATE) for s in expected.values())
    bits = report.bits_per_sample
    assert bits.given_input.flac == (flac.stereo_bytes - flac.input_bytes) * 8 / flac.frames
    assert bits.flac_target_alone == flac.target_bytes * 8 / flac.frames
    md = Path(report.files.md).read_text()
    assert "| WavPack -hhx6 of target given input | 8.000 |" in md
    assert "| Sac --normal of target given input | 8.000 |" in md
    assert "WavPack -hhx6: wavpack 9.9.9" in md and "slightly favours" in md
    data = json.loads(Path(report.files.json).read_text())
    assert data["coders"]["sac"]["version"] == "Sac v0.0.1 - a stand-in"
    assert data["per_source"][0]["given_input"]["wavpack"] == 8.0


def _segment() -> Segment:
    rng = np.random.default_rng(0)
    return Segment("song", 0, (rng.integers(0, 65536, (2, 4096)).astype(np.uint16),))


def test_r2l_codes_the_right_channel_as_the_input(fakes):
    segment = _segment()
    rows = measure_coders([segment], RATE, input_channel=1)
    _, mono = _recorded(fakes / "wavpack")
    assert _same(mono, [segment.samples()[1]])
    assert rows.flac.cost.input_bytes == flac_bytes(segment.samples()[1], RATE)


def test_a_missing_or_failing_coder_is_a_skipped_row_with_its_reason(
    export, shard_dir, tmp_path, monkeypatch
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sac", "Sac v0.0.1", tmp_path / "record", fail=True)
    monkeypatch.setenv("PATH", str(bin_dir))  # no wavpack here
    rows = measure_coders([_segment()], RATE, input_channel=0)
    assert rows.wavpack.skipped == "wavpack not on PATH (apt-get install wavpack)"
    assert rows.wavpack.cost is None and rows.wavpack.per_source == {}
    assert rows.sac.skipped.startswith(f"failed: {bin_dir / 'sac'} exited 3: could not open")
    assert rows.flac.skipped is None and rows.flac.cost.frames == 4096

    report = evaluate(
        export, shard_dir, max_chunks=1, generate=0, out=tmp_path / "eval", seq_len=SEQ,
        progress=False,
    )  # fmt: skip
    assert report.bits_per_sample.given_input.wavpack is None
    md = Path(report.files.md).read_text()
    assert "| WavPack -hhx6 of target given input | skipped: wavpack not on PATH" in md
    assert "| Sac --normal of target given input | skipped: failed: " in md
    assert json.loads(Path(report.files.json).read_text())["coders"]["wavpack"]["cost"] is None
