"""MP4-family audio through PyAV: exact lengths, stems, forward-only decoding, the pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.audio import AudioReader, probe, quantize
from pipeline.index import build_index
from pipeline.records import AudioIndex
from pipeline.shard import write_shards
from pipeline.splits import decide_splits
from pipeline.verify import verify

av = pytest.importorskip("av")

RATE = 16000
FRAMES = 5 * 4096 + 1000  # not a multiple of AAC's 1024-sample frame
NAMES = ["Drums", "Bass", "Other", "Vocals"]


def _signal(seed: int, frames: int = FRAMES) -> np.ndarray:
    """`[frames, 2]` float: a tone and some noise, different per seed and per channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / RATE
    tone = 0.2 * np.sin(2 * np.pi * (150 + 170 * seed) * t)
    return np.stack([tone, 0.5 * tone], axis=1) + rng.normal(0, 0.02, (frames, 2))


def encode(path: Path, streams: list[np.ndarray], stem_json: str | None = None) -> Path:
    """One AAC stereo stream per `[n, 2]` float array, interleaved as a muxer writes them."""
    options = {"movflags": "use_metadata_tags"} if stem_json else {}
    container = av.open(str(path), "w", format="mp4", options=options)
    if stem_json:
        container.metadata["stem"] = stem_json
    outs = [container.add_stream("aac", rate=RATE, layout="stereo") for _ in streams]
    for pos in range(0, len(streams[0]), 1024):
        for out, data in zip(outs, streams, strict=True):
            block = np.ascontiguousarray(data[pos : pos + 1024].T.astype(np.float32))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = RATE, pos
            for packet in out.encode(frame):
                container.mux(packet)
    for out in outs:
        for packet in out.encode(None):
            container.mux(packet)
    container.close()
    return path


def stem_file(path: Path, summed: bool = True) -> Path:
    """A `.stem.mp4`: 4 different stems and a mixture that is their sum (or not, `summed`)."""
    stems = [_signal(seed) for seed in range(1, 5)]
    mixture = sum(stems) if summed else _signal(9)
    stem_json = json.dumps({"stems": [{"name": n} for n in NAMES]})
    return encode(path, [mixture, *stems], stem_json)


def pyav_decode(path: Path, stream: int) -> np.ndarray:
    """PyAV's own sequential decode of one stream, rounded like the project: int16 `[2, n]`."""
    with av.open(str(path)) as container:
        data = np.concatenate([f.to_ndarray() for f in container.decode(audio=stream)], axis=1)
    return quantize(data.T.astype(np.float64)).T


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mp4") / "tree"
    (root / "Song A").mkdir(parents=True)
    (root / "test").mkdir()
    return {
        "root": root,
        "stem": stem_file(root / "Song A" / "song.stem.mp4"),
        "m4a": encode(root / "Song B.M4A", [_signal(7)]),
        "test": stem_file(root / "test" / "other.stem.mp4", summed=False),
    }


def test_frame_counts_are_the_encoded_length(files):
    assert pyav_decode(files["m4a"], 0).shape[1] > FRAMES  # the decoder pads the last frame
    assert probe(files["m4a"]).frames == FRAMES
    for stem in ("mixture", "drums", "vocals"):
        info = probe(f"{files['stem']}#{stem}")
        assert (info.frames, info.sample_rate, info.channels, info.subtype) == (
            FRAMES,
            RATE,
            2,
            "AAC",
        )
    assert probe(files["stem"]).stems == ("mixture", "drums", "bass", "other", "vocals")
    assert probe(files["m4a"]).decoder == (
        f"av {av.__version__}, libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}"
    )


def test_each_stem_reads_its_own_stream_as_pyav_decodes_it(files):
    decoded = []
    for stream, stem in enumerate(("mixture", "drums", "bass", "other", "vocals")):
        with AudioReader(f"{files['stem']}#{stem}") as reader:
            frames = reader.read()
        assert np.array_equal(frames, pyav_decode(files["stem"], stream)[:, :FRAMES])
        decoded.append(frames)
    assert not any(np.array_equal(decoded[0], d) for d in decoded[1:])
    with AudioReader(files["stem"]) as reader:  # no stem named: stream 0, the mixture
        assert np.array_equal(reader.read(), decoded[0])


def test_blocks_in_order_and_backwards_reads_equal_one_forward_decode(files):
    expected = pyav_decode(files["m4a"], 0)[:, :FRAMES]
    with AudioReader(files["m4a"]) as reader:
        blocks = list(reader.blocks(block_frames=1500))
        assert np.array_equal(np.concatenate(blocks, axis=1), expected)
        assert np.array_equal(reader.read(9000, 3000), expected[:, 9000:12000])
        assert np.array_equal(reader.read(100, 50), expected[:, 100:150])  # behind: reopen
        assert np.array_equal(reader.read(20000, 5000), expected[:, 20000:])


def test_resampled_read_goes_through_soxr_like_any_file(files):
    with AudioReader(files["m4a"], sample_rate=8000) as reader:
        assert reader.frames == FRAMES // 2
        assert reader.read().shape == (2, FRAMES // 2)


def test_unknown_stem_is_a_clear_error(files):
    with pytest.raises(Exception, match=r"no stem 'piano' \(the file has mixture, drums"):
        probe(f"{files['stem']}#piano")


def test_index_shard_verify_against_source(files, tmp_path):
    index = tmp_path / "index.json"
    result = build_index(files["root"], index, jobs=1, progress=False)
    assert sorted(result.index.files) == [
        "Song A/song.stem.mp4",
        "Song B.M4A",
        "test/other.stem.mp4",
    ]
    entry = result.index.files["Song A/song.stem.mp4"]
    assert (entry.frames, entry.streams, entry.stems[1]) == (FRAMES, 5, "drums")
    assert AudioIndex.load(index).files == result.index.files
    out = tmp_path / "shards"
    manifest = write_shards(index, out, jobs=1, progress=False, chunk_frames=4096, val=0.0)
    assert sum(manifest.samples(s) for s in manifest.shards) == 3 * 5  # 5 whole chunks each
    assert verify(out, against_source=True, progress=False) == []


def test_stems_all_indexes_each_stem_within_its_song(files, tmp_path):
    result = build_index(files["root"], tmp_path / "i.json", jobs=1, progress=False, stems="all")
    song = [k for k in result.index.files if k.startswith("Song A/")]
    assert song == [
        f"Song A/song.stem.mp4#{n}" for n in ("bass", "drums", "mixture", "other", "vocals")
    ]
    assert "Song B.M4A" in result.index.files  # one stream: its own path
    digests = {result.index.files[k].sha256 for k in song}
    assert None in digests or len(digests) == 5  # a fingerprint never makes stems copies
    chunks = {key: 5 for key in result.index.files}
    for group_by in ("parent", r"regex:([^/]+)\.stem\.mp4"):
        splits = decide_splits(chunks, group_by, seed=0, val=0.5, test=0.0, kept={})
        assert len({splits.of[k] for k in song}) == 1, group_by
        assert splits.of["test/other.stem.mp4#drums"][0] == "test"


def test_stems_all_group_by_file_is_the_song(files, tmp_path):
    result = build_index(files["root"], tmp_path / "i.json", jobs=1, progress=False, stems="all")
    song = [k for k in result.index.files if k.startswith("Song A/")]
    splits = decide_splits({k: 5 for k in song}, "file", seed=0, val=0.5, test=0.0, kept={})
    assert {splits.of[k][1] for k in song} == {"Song A/song.stem.mp4"}


def test_stems_sum_reports_whether_the_mixture_is_the_sum(files, tmp_path):
    index = build_index(files["root"], tmp_path / "i.json", jobs=1, progress=False, stems="sum")
    matched = index.index.files["Song A/song.stem.mp4"].stems_sum_db
    unrelated = index.index.files["test/other.stem.mp4"].stems_sum_db
    assert matched >= 20.0 > unrelated
    assert index.index.files["Song B.M4A"].stems_sum_db is None


def test_reindex_reuses_only_what_the_same_stems_mode_wrote(files, tmp_path):
    out = tmp_path / "i.json"
    assert build_index(files["root"], out, jobs=1, progress=False).opened == 3
    assert build_index(files["root"], out, jobs=1, progress=False).opened == 0
    again = build_index(files["root"], out, jobs=1, progress=False, stems="all")
    assert again.opened == 2  # the multi-stream files; the single-stream m4a is reused


def test_missing_pyav_rejects_with_the_fix_then_reindexes(files, tmp_path, monkeypatch):
    out = tmp_path / "i.json"
    monkeypatch.setitem(sys.modules, "av", None)
    result = build_index(files["root"], out, jobs=1, progress=False)
    assert result.index.files == {}
    reason = result.index.rejected["Song B.M4A"].reason
    assert reason == 'MP4-family audio needs PyAV, which is not installed: pip install -e ".[av]"'
    monkeypatch.undo()
    assert sorted(build_index(files["root"], out, jobs=1, progress=False).index.files) == [
        "Song A/song.stem.mp4",
        "Song B.M4A",
        "test/other.stem.mp4",
    ]
